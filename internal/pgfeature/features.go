package pgfeature

import (
	"context"
	"fmt"
	"strings"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// ServerVersion is server_version_num (e.g. 170010).
func ServerVersion(ctx context.Context, q dbconn.Querier) (int, error) {
	v, _, err := Version(ctx, q)
	return v, err
}

// Version is server_version_num and server_version as the server prints
// it ("17.2 (Debian 17.2-1)").
func Version(ctx context.Context, q dbconn.Querier) (num int, text string, err error) {
	if err := q.QueryRow(ctx, "SELECT current_setting('server_version_num')::int, current_setting('server_version')").Scan(&num, &text); err != nil {
		return 0, "", fmt.Errorf("read the server's version: %w", err)
	}
	return num, text, nil
}

// OriginNone decides whether the walsender may drop every transaction that
// carries an origin (pgoutput's origin 'none'): only on PostgreSQL 16+, and
// only where nothing else replicates into the table, whose changes carry an
// origin too and would be lost to the stream: no subscription of this
// database covers the table, and no replication origin other than the
// daemons' exists. It says why in a sentence.
func OriginNone(ctx context.Context, q dbconn.Querier, filter config.OriginFilter, table string) (bool, string, error) {
	if filter == config.OriginFilterClient {
		return false, "the daemon skips its own transactions (sync.origin_filter: client)", nil
	}
	v, err := ServerVersion(ctx, q)
	if err != nil {
		return false, "", err
	}
	if v < 160000 {
		return false, "the daemon skips its own transactions (PostgreSQL 15 has no origin filter in the walsender)", nil
	}
	var subscribed bool
	if err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_subscription_rel WHERE srrelid = $1::regclass)`, table).Scan(&subscribed); err != nil {
		return false, "", fmt.Errorf("look for subscriptions into %s: %w", table, err)
	}
	if subscribed {
		return false, fmt.Sprintf("the daemon skips its own transactions: a subscription writes into %s, and the walsender's origin filter would drop those changes too", table), nil
	}
	rows, err := q.Query(ctx, `SELECT roname FROM pg_replication_origin WHERE NOT starts_with(roname, 'cdcbackfill_') ORDER BY roname LIMIT 3`)
	if err != nil {
		return false, "", fmt.Errorf("read replication origins: %w", err)
	}
	var others []string
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return false, "", err
		}
		others = append(others, name)
	}
	if err := rows.Err(); err != nil {
		return false, "", err
	}
	if len(others) > 0 {
		return false, fmt.Sprintf("the daemon skips its own transactions: other replication origins exist (%s), whose changes the walsender's origin filter would drop", strings.Join(others, ", ")), nil
	}
	return true, "the walsender drops the daemon's own transactions (origin 'none', PostgreSQL 16+)", nil
}

// FailoverSlot says whether the slot is created with failover (PostgreSQL
// 17+), and what a failover of the primary means for the migration.
func FailoverSlot(ctx context.Context, q dbconn.Querier) (bool, string, error) {
	v, err := ServerVersion(ctx, q)
	if err != nil {
		return false, "", err
	}
	if v < 170000 {
		return false, "a promoted standby has no copy of the slot (PostgreSQL 16 and older): after a failover, run `cdcbackfill recover`, which backfills again with a new slot", nil
	}
	var standbySlots string
	if err := q.QueryRow(ctx, `SELECT current_setting('synchronized_standby_slots', true)`).Scan(&standbySlots); err != nil {
		return false, "", fmt.Errorf("read synchronized_standby_slots: %w", err)
	}
	if standbySlots == "" {
		return true, "the slot is created with failover, so a standby with sync_replication_slots = on keeps a copy; set synchronized_standby_slots on the primary so the stream never gets ahead of the standby, or a failover may lose changes the daemon saw", nil
	}
	return true, fmt.Sprintf("the slot is created with failover and the stream waits for the standby slots %s: after a failover to a standby with sync_replication_slots = on, the daemon resumes", standbySlots), nil
}

// IdleSlotTimeout is PostgreSQL 18's idle_replication_slot_timeout: a slot
// unused that long is invalidated ("" when unset or older servers).
func IdleSlotTimeout(ctx context.Context, q dbconn.Querier) (string, error) {
	var s string
	err := q.QueryRow(ctx, `SELECT coalesce(current_setting('idle_replication_slot_timeout', true), '0')`).Scan(&s)
	if err != nil {
		return "", fmt.Errorf("read idle_replication_slot_timeout: %w", err)
	}
	if s == "0" || s == "" {
		return "", nil
	}
	return s, nil
}
