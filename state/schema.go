package state

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// schemaSQL creates the store; idempotent. It runs only when the catalog
// lacks a table or column of required: ALTER TABLE takes an ACCESS
// EXCLUSIVE lock on the state table, which every status and every standby
// reads.
const schemaSQL = `
CREATE SCHEMA IF NOT EXISTS cdcbackfill;
CREATE TABLE IF NOT EXISTS cdcbackfill.migrations (
	name text PRIMARY KEY,
	phase text NOT NULL DEFAULT 'expand',
	expand_done int NOT NULL DEFAULT 0,
	contract_done int NOT NULL DEFAULT 0,
	rollback_done int NOT NULL DEFAULT 0,
	slot_lsn pg_lsn,
	plan jsonb,
	ranges jsonb,
	rows_done bigint NOT NULL DEFAULT 0,
	rows_total bigint NOT NULL DEFAULT 0,
	sync_events bigint NOT NULL DEFAULT 0,
	corrections bigint NOT NULL DEFAULT 0,
	last_correction_at timestamptz,
	verify_cursor text[],
	verify_rows_checked bigint NOT NULL DEFAULT 0,
	verify_mismatches bigint NOT NULL DEFAULT 0,
	mismatch_samples text[] NOT NULL DEFAULT '{}',
	clean_since timestamptz,
	paused boolean NOT NULL DEFAULT false,
	approved_phase text,
	abort_requested boolean NOT NULL DEFAULT false,
	rollback_requested boolean NOT NULL DEFAULT false,
	stats jsonb NOT NULL DEFAULT '{}',
	error text,
	created_at timestamptz NOT NULL DEFAULT now(),
	updated_at timestamptz NOT NULL DEFAULT now(),
	phase_started_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS cdcbackfill.events (
	id bigserial PRIMARY KEY,
	name text NOT NULL,
	at timestamptz NOT NULL DEFAULT now(),
	phase text NOT NULL,
	kind text NOT NULL,
	detail jsonb NOT NULL DEFAULT '{}'
);
ALTER TABLE cdcbackfill.migrations
	ADD COLUMN IF NOT EXISTS verify_pass_started timestamptz,
	ADD COLUMN IF NOT EXISTS clean_pass_started timestamptz,
	ADD COLUMN IF NOT EXISTS handover_lsn pg_lsn,
	ADD COLUMN IF NOT EXISTS pass_done boolean NOT NULL DEFAULT false,
	ADD COLUMN IF NOT EXISTS hold_proven_ms bigint NOT NULL DEFAULT 0,
	ADD COLUMN IF NOT EXISTS premature_detections int NOT NULL DEFAULT 0,
	ADD COLUMN IF NOT EXISTS accepted_mismatches bigint NOT NULL DEFAULT 0,
	ADD COLUMN IF NOT EXISTS force_approved boolean NOT NULL DEFAULT false,
	ADD COLUMN IF NOT EXISTS old_usage jsonb,
	ADD COLUMN IF NOT EXISTS cutover jsonb;
CREATE TABLE IF NOT EXISTS cdcbackfill.retry_keys (
	name text NOT NULL,
	key text[] NOT NULL,
	PRIMARY KEY (name, key)
);
CREATE TABLE IF NOT EXISTS cdcbackfill.mismatches (
	name text NOT NULL,
	key text[] NOT NULL,
	actual text[] NOT NULL,
	expected text[] NOT NULL,
	first_seen timestamptz NOT NULL DEFAULT now(),
	last_seen timestamptz NOT NULL DEFAULT now(),
	accepted boolean NOT NULL DEFAULT false,
	PRIMARY KEY (name, key)
);`

// required is every table and column the store uses.
var required = map[string][]string{
	"migrations": {"name", "phase", "expand_done", "contract_done", "rollback_done", "slot_lsn", "plan", "ranges",
		"rows_done", "rows_total", "sync_events", "corrections", "last_correction_at", "verify_cursor",
		"verify_rows_checked", "verify_mismatches", "mismatch_samples", "clean_since", "paused", "approved_phase",
		"abort_requested", "rollback_requested", "stats", "error", "created_at", "updated_at", "phase_started_at",
		"verify_pass_started", "clean_pass_started", "handover_lsn", "pass_done", "hold_proven_ms",
		"premature_detections", "accepted_mismatches", "force_approved", "old_usage", "cutover"},
	"events":     {"id", "name", "at", "phase", "kind", "detail"},
	"retry_keys": {"name", "key"},
	"mismatches": {"name", "key", "actual", "expected", "first_seen", "last_seen", "accepted"},
}

// schemaTries bounds the attempts to get the state tables' locks.
const schemaTries = 30

// EnsureSchema creates or completes the store when the catalog says it is
// needed, under lockTimeout, retried with backoff: a long query on the state
// tables (a status, a dashboard) must not queue everything behind the DDL.
func EnsureSchema(ctx context.Context, conn *pgx.Conn, lockTimeout time.Duration) error {
	missing, err := missingParts(ctx, conn)
	if err != nil || len(missing) == 0 {
		return err
	}
	backoff := dbconn.NewBackoff(100*time.Millisecond, 5*time.Second)
	for try := 1; ; try++ {
		err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if err := dbconn.SetLockTimeout(ctx, tx, lockTimeout, true); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, schemaSQL)
			return err
		})
		if err == nil {
			return nil
		}
		if !dbconn.IsLockTimeout(err) || try == schemaTries {
			return fmt.Errorf("create state schema cdcbackfill (missing %s): %w", strings.Join(missing, ", "), err)
		}
		if err := dbconn.Sleep(ctx, backoff.Next()); err != nil {
			return err
		}
	}
}

// missingParts lists the tables and columns of required the catalog lacks.
func missingParts(ctx context.Context, q dbconn.Querier) ([]string, error) {
	rows, err := q.Query(ctx, `SELECT c.relname, a.attname FROM pg_attribute a
		JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'cdcbackfill' AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped`)
	if err != nil {
		return nil, fmt.Errorf("read the state schema's catalog: %w", err)
	}
	have := map[string]bool{}
	for rows.Next() {
		var rel, col string
		if err := rows.Scan(&rel, &col); err != nil {
			return nil, err
		}
		have[rel+"."+col] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read the state schema's catalog: %w", err)
	}
	var missing []string
	for rel, cols := range required {
		for _, c := range cols {
			if !have[rel+"."+c] {
				missing = append(missing, "cdcbackfill."+rel+"."+c)
			}
		}
	}
	return missing, nil
}
