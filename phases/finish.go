package phases

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// contract waits for approval (manual) or goes on (auto), then runs the
// contract DDL, each statement once, and drops slot, publication and
// origins. The stream stops before the DDL: the expressions read the
// column the DDL drops. It first catches up, so nothing the application
// wrote before the DDL is left unapplied.
func (d *Daemon) contract(ctx context.Context, st *State) error {
	if st.ContractDone == 0 {
		if err := d.startPipeline(ctx); err != nil {
			return err
		}
		if d.cfg.ContractPolicy.Mode == "manual" && d.approved.Load() != Contract {
			d.log.Info("contract: parity holds; waiting for approval (cdcbackfill approve)")
			for d.approved.Load() != Contract {
				if err := d.pipe.Load().failure(); err != nil {
					return fmt.Errorf("sync stream: %w", err)
				}
				if err := sleep(ctx, 200*time.Millisecond); err != nil {
					return nil
				}
			}
		}
		lsn, err := d.insertLSN(ctx)
		if err != nil {
			return err
		}
		if err := d.pipe.Load().waitApplied(ctx, lsn); err != nil {
			return fmt.Errorf("contract: catch up the stream: %w", err)
		}
	}
	if p := d.pipe.Swap(nil); p != nil {
		p.stop()
	}
	if err := d.runDDL(ctx, Contract, d.cfg.Contract, st.ContractDone, "contract_done"); err != nil {
		return err
	}
	if err := d.dropReplication(ctx); err != nil {
		return err
	}
	d.log.Info("migration done: contract DDL ran; slot, publication and origins dropped")
	return d.store.SetPhase(ctx, d.conn, Contract, Done, nil)
}

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
	if _, err := d.conn.Exec(ctx, `DELETE FROM cdcbackfill.retry_keys WHERE name = $1`, d.cfg.Name); err != nil {
		return fmt.Errorf("forget skipped keys: %w", err)
	}
	return nil
}

// performAbort ends the migration before contract: the stream stops, the
// slot, publication and origins are dropped, and with rollback the
// rollback statements run (each once).
func (d *Daemon) performAbort(ctx context.Context) error {
	if p := d.pipe.Swap(nil); p != nil {
		p.stop()
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
