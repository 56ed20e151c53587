package phases

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// expand runs each expand statement not yet done, each once.
func (d *Daemon) expand(ctx context.Context, st *state.Migration) error {
	if err := d.runDDL(ctx, state.Expand, d.finish.Expand, st.ExpandDone); err != nil {
		return err
	}
	if err := d.table.Refresh(ctx, d.conn); err != nil {
		return err
	}
	if missing := d.table.MissingColumns(); len(missing) > 0 {
		return fmt.Errorf("expand is done but column(s) %s of %s do not exist: add them in expand", strings.Join(missing, ", "), d.table.Ident())
	}
	// The recompute statements can now be prepared: a type that does not fit
	// its column fails here, before any slot exists.
	if _, err := d.conn.Prepare(ctx, "", d.table.KeysSQL()); err != nil {
		return fmt.Errorf("recompute statement for %s does not prepare: %w", d.table.Ident(), err)
	}
	d.findSources(ctx)
	return d.store.Move(ctx, d.conn, state.Expand, state.Backfill, nil)
}

func (d *Daemon) ddlRunner() DDLRunner {
	return DDLRunner{
		LockTimeout: d.cfg.DDL.LockTimeout,
		MaxRetries:  d.cfg.DDL.MaxRetries,
		Table:       d.table.Ident(),
		Log:         d.log,
		OnRetry:     func() { d.figures.obs.ddlRetries.Add(1) },
	}
}

// runDDL runs the statements of a phase from index done on, each once: the
// count of completed statements is saved in each statement's own
// transaction.
func (d *Daemon) runDDL(ctx context.Context, phase state.Phase, stmts []string, done int) error {
	runner := d.ddlRunner()
	for i := done; i < len(stmts); i++ {
		stmt := stmts[i]
		d.log.Info(string(phase)+": running DDL", "statement", stmt, "step", i+1, "of", len(stmts))
		record := func(tx pgx.Tx) error { return d.store.StatementDone(ctx, tx, phase, i+1) }
		var res DDLResult
		var err error
		if s, perr := ddl.Parse(stmt); perr == nil {
			if schema, name, ok := s.ConcurrentIndex(); ok {
				// Done only once the catalog holds it valid.
				b := ddl.IndexBuild{SQL: stmt, Schema: schema, Name: name, Timeout: d.cfg.DDL.ConcurrentTimeout,
					MaxRetries: d.cfg.DDL.MaxRetries, Log: d.log, Waiting: func(s string) { d.figures.waiting.Store(s) }}
				if res.Tries, err = b.Run(ctx, d.conn); err == nil {
					err = pgx.BeginFunc(ctx, d.conn, record)
				}
			} else {
				res, err = runner.Run(ctx, d.conn, stmt, record)
			}
		} else {
			res, err = runner.Run(ctx, d.conn, stmt, record)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", phase, err)
		}
		d.log.Info(string(phase)+": DDL done", "statement", stmt, "tries", res.Tries, "lock_wait", res.LockWait)
		if err := d.store.Event(ctx, d.conn, phase, "ddl", map[string]any{
			"statement": stmt, "tries": res.Tries, "lock_wait_ms": res.LockWait.Milliseconds()}); err != nil {
			return err
		}
	}
	return nil
}
