package phases

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// dropReplication removes everything the daemon made for the stream.
func (d *Daemon) dropReplication(ctx context.Context) error {
	if err := snapshot.DropSlot(ctx, d.conn, d.cfg.SlotName()); err != nil {
		return err
	}
	if err := snapshot.DropPublication(ctx, d.conn, d.cfg.PublicationName()); err != nil {
		return err
	}
	if err := dropOrigins(ctx, d.conn, d.cfg.OriginPrefix()); err != nil {
		return err
	}
	return d.store.ForgetKeys(ctx, d.conn)
}

// performAbort ends the migration before the contract DDL commits: the
// stream stops, the slot, publication and origins are dropped, and with
// rollback the rollback statements run (each once).
func (d *Daemon) performAbort(ctx context.Context) error {
	d.repl.stopPipeline()
	return abortNow(ctx, d.conn, d.store, d.cfgAbort())
}

// abortPlan is what abort needs from the config.
type abortPlan struct {
	slot, publication, originPrefix string
	rollback                        []string
	// undo drops what was built for the new columns (indexes, constraints):
	// a NOT VALID check left behind would fail the old release's writes.
	undo   []ddl.Undo
	table  string // quoted
	runner DDLRunner
}

func (d *Daemon) cfgAbort() abortPlan {
	return abortPlan{slot: d.cfg.SlotName(), publication: d.cfg.PublicationName(), originPrefix: d.cfg.OriginPrefix(),
		rollback: d.cfg.Rollback, undo: d.finish.Undo, table: d.table.Ident(), runner: d.ddlRunner()}
}

// tooLate explains why a migration past its contract DDL cannot be aborted.
func tooLate(name string, st *state.Migration) error {
	return fmt.Errorf("abort: too late: the contract DDL of migration %q has committed (phase %s): the old column is gone and the application's data lives in the new columns; there is nothing to roll back to",
		name, st.Phase)
}

func abortNow(ctx context.Context, conn *pgx.Conn, store state.Store, p abortPlan) error {
	st, err := store.Load(ctx, conn)
	if err != nil {
		return err
	}
	if st.Phase == state.Aborted {
		return nil
	}
	if !abortable(st) {
		return tooLate(store.Name, st)
	}
	if err := snapshot.DropSlot(ctx, conn, p.slot); err != nil {
		return fmt.Errorf("abort: %w", err)
	}
	// The application keeps writing: the publication is dropped while a
	// SHARE lock keeps its writes out for that moment (a DROP PUBLICATION
	// that commits while a write is building its view of the table's
	// publications fails the write), under lock_timeout, retried.
	if _, err := p.runner.Run(ctx, conn, "LOCK TABLE "+p.runner.Table+" IN SHARE MODE; DROP PUBLICATION IF EXISTS "+
		pgx.Identifier{p.publication}.Sanitize(), func(pgx.Tx) error { return nil }); err != nil {
		return fmt.Errorf("abort: drop publication %q: %w", p.publication, err)
	}
	if err := dropOrigins(ctx, conn, p.originPrefix); err != nil {
		return fmt.Errorf("abort: %w", err)
	}
	if err := store.ForgetKeys(ctx, conn); err != nil {
		return fmt.Errorf("abort: %w", err)
	}
	if err := p.dropBuilt(ctx, conn); err != nil {
		return err
	}
	if st.RollbackRequested && st.ExpandDone == 0 {
		// Nothing of expand ran: there is nothing to roll back, and the
		// statements would fail on columns that were never added.
		p.rollback = nil
	}
	if st.RollbackRequested {
		for i := st.RollbackDone; i < len(p.rollback); i++ {
			if _, err := p.runner.Run(ctx, conn, p.rollback[i], func(tx pgx.Tx) error {
				return store.StatementDone(ctx, tx, state.Aborted, i+1)
			}); err != nil {
				return fmt.Errorf("abort --rollback: %w", err)
			}
		}
	}
	return store.Move(ctx, conn, st.Phase, state.Aborted, map[string]any{"rollback": st.RollbackRequested})
}

// dropBuilt drops what was built for the new columns (indexes,
// constraints), only what exists: dropping a constraint takes the table's
// ACCESS EXCLUSIVE lock, even for nothing.
func (p abortPlan) dropBuilt(ctx context.Context, conn *pgx.Conn) error {
	for _, u := range p.undo {
		var there bool
		var err error
		if u.Index {
			var st ddl.IndexState
			st, err = ddl.LookupIndex(ctx, conn, u.Schema, u.Name)
			there = st != ddl.IndexMissing
		} else {
			there, _, err = constraintState(ctx, conn, p.table, u.Name)
		}
		if err != nil {
			return fmt.Errorf("abort: %w", err)
		}
		if !there {
			continue
		}
		if _, err := p.runner.Run(ctx, conn, u.SQL, func(pgx.Tx) error { return nil }); err != nil {
			return fmt.Errorf("abort: drop what was built for the new columns: %w", err)
		}
	}
	return nil
}
