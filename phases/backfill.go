package phases

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// slotCreateTimeout bounds the wait for open writing transactions when the
// slot is created.
const slotCreateTimeout = 2 * time.Minute

// backfill creates the slot (once), starts the stream, walks the planned
// key range and retries the keys the application held.
func (d *Daemon) backfill(ctx context.Context, st *state.Migration) error {
	if st.Plan == nil {
		var err error
		if st, err = d.startSlot(ctx); err != nil {
			return err
		}
	}
	if err := d.startPipeline(ctx); err != nil {
		return err
	}
	conns, err := d.writerConns(ctx, len(st.Ranges), "b")
	if err != nil {
		return err
	}
	defer closeAll(conns)

	b := &snapshot.Backfiller{
		Table:           d.table,
		BatchSize:       d.cfg.Backfill.BatchSize,
		TargetBatchTime: d.cfg.Backfill.TargetBatchTime,
		Sleep:           d.cfg.Backfill.Sleep,
		LockTimeout:     d.cfg.DDL.LockTimeout,
		Throttle:        d.newThrottle("backfill"),
		Log:             d.log,
		Checkpoint:      recordBatch(d.store),
	}
	d.log.Info("backfill: walking the key range", "rows_total", st.RowsTotal, "rows_done", st.RowsDone, "workers", len(st.Ranges))
	pgConns := conns
	if err := d.repl.pipe.Load().guard(ctx, func(ctx context.Context) error { return b.Run(ctx, pgConns, st.Ranges) }); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return nil
	}
	if st, err = d.store.Load(ctx, d.conn); err != nil {
		return err
	}
	for _, r := range st.Ranges {
		if !r.Done {
			return nil // stopped early (paused or signalled): the loop resumes
		}
	}
	if err := d.retrySkipped(ctx, pgConns[0]); err != nil || ctx.Err() != nil {
		return err
	}
	d.log.Info("backfill: done", "rows_done", st.RowsDone)
	return d.store.Move(ctx, d.conn, state.Backfill, state.Sync, map[string]any{"rows_done": st.RowsDone})
}

// startSlot creates publication and slot, reads the plan in the slot's
// snapshot and saves it. A slot that exists without a saved plan (a crash
// between the two) is kept, never recreated: the plan is then read now.
func (d *Daemon) startSlot(ctx context.Context) (*state.Migration, error) {
	// CREATE PUBLICATION takes a lock on the table that conflicts with
	// other DDL (and VACUUM): under lock_timeout, retried, like expand.
	if err := snapshot.EnsurePublication(ctx, d.conn, d.cfg.PublicationName(), d.table, func(stmt string) error {
		_, err := d.ddlRunner().Run(ctx, d.conn, stmt, func(pgx.Tx) error { return nil })
		return err
	}); err != nil {
		return nil, err
	}
	plan, lsn, err := d.slotAndPlan(ctx)
	if err != nil {
		return nil, err
	}
	if plan.Estimate == 0 && plan.Hi != nil {
		// Never analyzed: count, chunked by the key so no statement runs
		// long; the count only sizes the progress bar.
		n, err := snapshot.CountRows(ctx, d.conn, d.table)
		if err != nil {
			return nil, err
		}
		plan.Estimate = n
	}
	ranges := snapshot.SplitRanges(d.table, plan.Plan, d.cfg.Backfill.Workers)
	if d.cfg.Backfill.Workers > 1 && len(ranges) == 1 {
		d.log.Info("backfill: one worker: only a single integer key is split into ranges", "workers", d.cfg.Backfill.Workers)
	}
	if err := d.store.SavePlan(ctx, d.conn, plan, ranges, lsn); err != nil {
		return nil, err
	}
	if err := d.store.Event(ctx, d.conn, state.Backfill, "slot", map[string]any{
		"slot": d.cfg.SlotName(), "consistent_lsn": lsn, "estimate": plan.Estimate, "recovered": plan.Recovered}); err != nil {
		return nil, err
	}
	d.log.Info("backfill: slot ready", "slot", d.cfg.SlotName(), "consistent_lsn", lsn, "estimated_rows", plan.Estimate)
	return d.store.Load(ctx, d.conn)
}

// slotAndPlan creates the slot and reads the plan in its exported
// snapshot; a slot that exists already is kept, and the plan read now. lsn
// is where the stream starts.
func (d *Daemon) slotAndPlan(ctx context.Context) (plan state.Plan, lsn string, err error) {
	info, err := snapshot.LookupSlot(ctx, d.conn, d.cfg.SlotName())
	if err != nil {
		return plan, "", err
	}
	if info.Exists {
		d.log.Warn("backfill: slot exists but no plan was saved (crash after creating it); reading the plan now", "slot", d.cfg.SlotName())
		p, err := snapshot.ReadPlanNow(ctx, d.conn, d.table)
		if err != nil {
			return plan, "", err
		}
		plan, lsn = state.Plan{Plan: p, Recovered: true}, info.ConfirmedLSN.String()
	} else {
		failover, _, err := pgfeature.FailoverSlot(ctx, d.conn)
		if err != nil {
			return plan, "", err
		}
		slot, err := snapshot.CreateSlot(ctx, d.cfg.Database.DSN, d.cfg.SlotName(), slotCreateTimeout, failover)
		if err != nil {
			return plan, "", err
		}
		p, err := snapshot.ReadPlan(ctx, d.conn, slot.SnapshotName, d.table)
		// The exported snapshot lives as long as the slot's connection: it
		// ends here, before anything slow (startSlot's count) runs.
		slot.Release()
		if err != nil {
			return plan, "", err
		}
		plan, lsn = state.Plan{Plan: p}, slot.ConsistentLSN.String()
	}
	return plan, lsn, nil
}

// recordBatch is the backfill's checkpoint: it saves a batch's cursor and
// counters in the batch's transaction, with the keys the application held.
func recordBatch(store state.Store) func(ctx context.Context, tx pgx.Tx, worker int, r snapshot.Range, res recompute.Result) error {
	return func(ctx context.Context, tx pgx.Tx, worker int, r snapshot.Range, res recompute.Result) error {
		return store.RecordBatch(ctx, tx, worker, r, res.Scanned, res.Skipped)
	}
}

// retrySkipped recomputes the keys the application held during their
// batch, until none is left.
func (d *Daemon) retrySkipped(ctx context.Context, conn *pgx.Conn) error {
	for ctx.Err() == nil {
		keys, err := d.store.RetryKeys(ctx, conn, 5000)
		if err != nil || len(keys) == 0 {
			return err
		}
		err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if err := dbconn.SetLockTimeout(ctx, tx, d.cfg.DDL.LockTimeout, true); err != nil {
				return err
			}
			res, err := d.table.Keys(ctx, tx, keys)
			if err != nil {
				return err
			}
			held := map[string]bool{}
			for _, k := range res.Skipped {
				held[k.ID()] = true
			}
			var done []recompute.Key
			for _, k := range keys {
				if !held[k.ID()] {
					done = append(done, k)
				}
			}
			if len(res.Skipped) > 0 {
				d.rlog.Info("backfill: rows still held by the application; retrying", "keys", len(res.Skipped))
			}
			return d.store.ForgetRetryKeys(ctx, tx, done)
		})
		if err != nil && !dbconn.IsLockTimeout(err) {
			return fmt.Errorf("retry held keys: %w", err)
		}
		if err := dbconn.Sleep(ctx, 200*time.Millisecond); err != nil {
			return nil
		}
	}
	return nil
}
