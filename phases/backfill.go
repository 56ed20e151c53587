package phases

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// slotCreateTimeout bounds the wait for open writing transactions when the
// slot is created.
const slotCreateTimeout = 2 * time.Minute

// backfill creates the slot (once), starts the stream, walks the planned
// key range and retries the keys the application held.
func (d *Daemon) backfill(ctx context.Context, st *State) error {
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

	throttle := snapshot.NewThrottle(snapshot.ThrottleConfig{
		MaxRowsPerSecond: d.cfg.Backfill.MaxRowsPerSecond,
		MaxReplicaLag:    d.cfg.Throttle.MaxReplicaLag,
		MaxSlotLag:       d.cfg.Throttle.MaxSlotLag,
		Slot:             d.cfg.SlotName(),
	}, d.pool, d.paused.Load)
	d.live.mu.Lock()
	d.live.throttleReason = throttle.Reason
	d.live.mu.Unlock()

	b := &snapshot.Backfiller{
		Table:           d.table,
		BatchSize:       d.cfg.Backfill.BatchSize,
		TargetBatchTime: d.cfg.Backfill.TargetBatchTime,
		Sleep:           d.cfg.Backfill.Sleep,
		Throttle:        throttle,
		Log:             d.log,
		Checkpoint:      d.checkpoint,
	}
	d.log.Info("backfill: walking the key range", "rows_total", st.RowsTotal, "rows_done", st.RowsDone, "workers", len(st.Ranges))
	pgConns := conns
	if err := d.pipe.Load().guard(ctx, func(ctx context.Context) error { return b.Run(ctx, pgConns, st.Ranges) }); err != nil {
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
	return d.store.SetPhase(ctx, d.conn, Backfill, Sync, map[string]any{"rows_done": st.RowsDone})
}

// startSlot creates publication and slot, reads the plan in the slot's
// snapshot and saves it. A slot that exists without a saved plan (a crash
// between the two) is kept, never recreated: the plan is then read now.
func (d *Daemon) startSlot(ctx context.Context) (*State, error) {
	if err := snapshot.EnsurePublication(ctx, d.conn, d.cfg.PublicationName(), d.table); err != nil {
		return nil, err
	}
	info, err := snapshot.LookupSlot(ctx, d.conn, d.cfg.SlotName())
	if err != nil {
		return nil, err
	}
	var plan Plan
	var lsn string
	if info.Exists {
		d.log.Warn("backfill: slot exists but no plan was saved (crash after creating it); reading the plan now", "slot", d.cfg.SlotName())
		p, err := snapshot.ReadPlanNow(ctx, d.conn, d.table)
		if err != nil {
			return nil, err
		}
		plan, lsn = Plan{Plan: p, Recovered: true}, info.ConfirmedLSN.String()
	} else {
		slot, err := snapshot.CreateSlot(ctx, d.cfg.Database.DSN, d.cfg.SlotName(), slotCreateTimeout)
		if err != nil {
			return nil, err
		}
		p, err := snapshot.ReadPlan(ctx, d.conn, slot.SnapshotName, d.table)
		slot.Release()
		if err != nil {
			return nil, err
		}
		plan, lsn = Plan{Plan: p}, slot.ConsistentLSN.String()
	}
	ranges := snapshot.SplitRanges(d.table, plan.Plan, d.cfg.Backfill.Workers)
	if d.cfg.Backfill.Workers > 1 && len(ranges) == 1 {
		d.log.Info("backfill: one worker: only a single integer key is split into ranges", "workers", d.cfg.Backfill.Workers)
	}
	if err := d.store.Update(ctx, d.conn, "plan = $2, ranges = $3, slot_lsn = $4::pg_lsn, rows_total = $5, rows_done = 0",
		plan, ranges, lsn, plan.Estimate); err != nil {
		return nil, err
	}
	if err := d.store.Event(ctx, d.conn, Backfill, "slot", map[string]any{
		"slot": d.cfg.SlotName(), "consistent_lsn": lsn, "estimate": plan.Estimate, "recovered": plan.Recovered}); err != nil {
		return nil, err
	}
	d.log.Info("backfill: slot ready", "slot", d.cfg.SlotName(), "consistent_lsn", lsn, "estimated_rows", plan.Estimate)
	return d.store.Load(ctx, d.conn)
}

// checkpoint saves a batch's cursor and counters in the batch's
// transaction, with the keys the application held.
func (d *Daemon) checkpoint(ctx context.Context, tx pgx.Tx, worker int, r snapshot.Range, res recompute.Result) error {
	if err := d.store.Update(ctx, tx, "ranges = jsonb_set(ranges, ARRAY[$2::text], $3::jsonb), rows_done = rows_done + $4",
		fmt.Sprint(worker), r, res.Scanned); err != nil {
		return err
	}
	for _, k := range res.Skipped {
		if _, err := tx.Exec(ctx, `INSERT INTO cdcbackfill.retry_keys (name, key) VALUES ($1, $2) ON CONFLICT DO NOTHING`, d.cfg.Name, []string(k)); err != nil {
			return fmt.Errorf("save skipped key: %w", err)
		}
	}
	return nil
}

// retrySkipped recomputes the keys the application held during their
// batch, until none is left.
func (d *Daemon) retrySkipped(ctx context.Context, conn *pgx.Conn) error {
	for ctx.Err() == nil {
		rows, err := conn.Query(ctx, `SELECT key FROM cdcbackfill.retry_keys WHERE name = $1 LIMIT 5000`, d.cfg.Name)
		if err != nil {
			return fmt.Errorf("read skipped keys: %w", err)
		}
		keys, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (recompute.Key, error) {
			var k []string
			err := r.Scan(&k)
			return k, err
		})
		if err != nil {
			return fmt.Errorf("read skipped keys: %w", err)
		}
		if len(keys) == 0 {
			return nil
		}
		err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			res, err := d.table.Keys(ctx, tx, keys)
			if err != nil {
				return err
			}
			held := map[string]bool{}
			for _, k := range res.Skipped {
				held[fmt.Sprint(k)] = true
			}
			for _, k := range keys {
				if held[fmt.Sprint(k)] {
					continue
				}
				if _, err := tx.Exec(ctx, `DELETE FROM cdcbackfill.retry_keys WHERE name = $1 AND key = $2`, d.cfg.Name, []string(k)); err != nil {
					return err
				}
			}
			if len(res.Skipped) > 0 {
				d.log.Info("backfill: rows still held by the application; retrying", "keys", len(res.Skipped))
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("retry skipped keys: %w", err)
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return nil
		}
	}
	return nil
}
