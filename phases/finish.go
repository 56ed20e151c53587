package phases

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// errNotBuilt marks phases this version does not carry out yet.
var errNotBuilt = errors.New("not built yet in this version")

// verify is not built yet: sync never leaves for it (see sync).
func (d *Daemon) verify(ctx context.Context, st *State) error {
	return fmt.Errorf("phase verify: %w; the migration stays correct in sync: run `cdcbackfill abort` to end it", errNotBuilt)
}

func (d *Daemon) contract(ctx context.Context, st *State) error {
	return fmt.Errorf("phase contract: %w", errNotBuilt)
}

// performAbort ends the migration before contract: the stream stops, the
// slot, publication and origins are dropped, and with rollback the
// rollback statements run (each once).
func (d *Daemon) performAbort(ctx context.Context) error {
	if d.pipe != nil {
		d.pipe.stop()
		d.pipe = nil
	}
	return abortNow(ctx, d.conn, d.store, d.cfgAbort())
}

// abortPlan is what abort needs from the config.
type abortPlan struct {
	slot, publication, originPrefix string
	rollback                        []string
	runner                          DDLRunner
}

func (d *Daemon) cfgAbort() abortPlan {
	r := d.ddlRunner()
	return abortPlan{slot: d.cfg.SlotName(), publication: d.cfg.PublicationName(), originPrefix: d.cfg.OriginPrefix(),
		rollback: d.cfg.Rollback, runner: r}
}

func abortNow(ctx context.Context, conn *pgx.Conn, store Store, p abortPlan) error {
	st, err := store.Load(ctx, conn)
	if err != nil {
		return err
	}
	if st.Phase == Aborted {
		return nil
	}
	if st.Phase == Contract && st.ContractDone > 0 || st.Phase == Done {
		return fmt.Errorf("abort: migration %q is past the contract DDL (phase %s): it cannot be aborted", store.Name, st.Phase)
	}
	if err := snapshot.DropSlot(ctx, conn, p.slot); err != nil {
		return fmt.Errorf("abort: %w", err)
	}
	if err := snapshot.DropPublication(ctx, conn, p.publication); err != nil {
		return fmt.Errorf("abort: %w", err)
	}
	if err := dropOrigins(ctx, conn, p.originPrefix); err != nil {
		return fmt.Errorf("abort: %w", err)
	}
	if _, err := conn.Exec(ctx, `DELETE FROM cdcbackfill.retry_keys WHERE name = $1`, store.Name); err != nil {
		return fmt.Errorf("abort: forget skipped keys: %w", err)
	}
	if st.RollbackRequested {
		for i := st.RollbackDone; i < len(p.rollback); i++ {
			stmt := p.rollback[i]
			if _, err := p.runner.Run(ctx, conn, stmt, func(tx pgx.Tx) error {
				return store.Update(ctx, tx, "rollback_done = $2", i+1)
			}); err != nil {
				return fmt.Errorf("abort --rollback: %w", err)
			}
		}
	}
	return store.SetPhase(ctx, conn, st.Phase, Aborted, map[string]any{"rollback": st.RollbackRequested})
}
