package phases

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// Beyond parity: contract only when nothing uses the old column. Where
// pg_stat_statements is installed (and its query texts are readable), the
// calls of every statement that names an old column are counted at the
// start of the hold and again at its end; a statement that ran meanwhile
// and names none of the new columns is an old release, a report or a cron
// job that the DROP would break. Auto contract waits until a whole hold
// passes without one; manual contract needs approve --force.

// oldColumnCalls returns, per statement of this database that names an old
// column and none of the new ones (and is not the daemon's own), its calls
// and text.
func oldColumnCalls(ctx context.Context, q dbconn.Querier, view string, cfg *config.Config) (map[string]state.UsedBy, error) {
	old := ddl.DroppedColumns(cfg.Contract)
	if len(old) == 0 {
		return nil, nil
	}
	newCols := cfg.ColumnNames()
	words := func(names []string) string {
		parts := make([]string, len(names))
		for i, n := range names {
			parts[i] = regexp.QuoteMeta(n)
		}
		return `\m(` + strings.Join(parts, "|") + `)\M`
	}
	rows, err := q.Query(ctx, `SELECT queryid::text, sum(calls)::bigint, min(query) FROM `+view+`
		WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND query ~* $1 AND query !~* $2
		  AND query NOT LIKE '%\_cdcb\_%' AND query NOT LIKE '%cdcbackfill%' AND query NOT LIKE '%pg_stat_statements%'
		GROUP BY queryid`, words(old), words(newCols))
	if err != nil {
		return nil, fmt.Errorf("read pg_stat_statements: %w", err)
	}
	out := map[string]state.UsedBy{}
	for rows.Next() {
		var id string
		var u state.UsedBy
		if err := rows.Scan(&id, &u.Calls, &u.Query); err != nil {
			return nil, err
		}
		out[id] = u
	}
	return out, rows.Err()
}

// startUsageWatch takes the baseline at the start of the hold, where the
// protection is available.
func (d *Daemon) startUsageWatch(ctx context.Context) error {
	view, err := pgfeature.StatementsView(ctx, d.conn)
	if err != nil {
		return nil // plan says whether it is available; nothing to watch
	}
	calls, err := oldColumnCalls(ctx, d.conn, view, d.cfg)
	if err != nil || calls == nil {
		return err
	}
	u := &state.OldUsage{Since: time.Now(), Baseline: map[string]int64{}}
	for id, c := range calls {
		u.Baseline[id] = c.Calls
	}
	return d.store.SetOldUsage(ctx, d.conn, u)
}

// oldColumnStillUsed compares with the baseline at the end of the hold. It
// records the statements that ran, and with contract_policy.mode auto
// reports them as blocking: the hold then starts again from a new baseline.
func (d *Daemon) oldColumnStillUsed(ctx context.Context, st *state.Migration) (bool, error) {
	if st.OldUsage == nil {
		return false, nil
	}
	view, err := pgfeature.StatementsView(ctx, d.conn)
	if err != nil {
		return false, nil
	}
	calls, err := oldColumnCalls(ctx, d.conn, view, d.cfg)
	if err != nil {
		return false, err
	}
	u := *st.OldUsage
	u.Still = nil
	for id, c := range calls {
		if ran := c.Calls - u.Baseline[id]; ran > 0 {
			u.Still = append(u.Still, state.UsedBy{Query: c.Query, Calls: ran})
		}
	}
	if len(u.Still) == 0 {
		return false, d.store.SetOldUsage(ctx, d.conn, &u)
	}
	queries := make([]string, 0, len(u.Still))
	for _, s := range u.Still[:min(len(u.Still), 3)] {
		queries = append(queries, strconv.Quote(s.Query)+" ("+strconv.FormatInt(s.Calls, 10)+" calls)")
	}
	if d.cfg.ContractPolicy.Mode == config.ContractManual {
		d.rlog.Warn("verify: statements that use the old column without the new ones ran during the hold; the contract will need approve --force",
			"statements", len(u.Still), "e.g.", strings.Join(queries, "; "))
		return false, d.store.SetOldUsage(ctx, d.conn, &u)
	}
	d.rlog.Warn("verify: statements that use the old column without the new ones ran during the hold; the contract waits for a hold without them",
		"statements", len(u.Still), "e.g.", strings.Join(queries, "; "))
	d.figures.waiting.Store(fmt.Sprintf("a hold during which nothing uses the old column: %d statements still did (see status)", len(u.Still)))
	next := &state.OldUsage{Since: time.Now(), Baseline: map[string]int64{}, Still: u.Still}
	for id, c := range calls {
		next.Baseline[id] = c.Calls
	}
	if err := d.store.ResetHold(ctx, d.conn); err != nil {
		return false, err
	}
	return true, d.store.SetOldUsage(ctx, d.conn, next)
}
