package phases

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// maxSamples bounds the mismatch keys kept for status.
const maxSamples = 10

// verify scans the whole table in key order, chunk by chunk, while the
// application dual-writes and the stream keeps checking. A row that differs
// is checked again once the stream has passed the position at which its
// chunk was read; only a difference that persists is a mismatch: it is
// repaired, logged with its key, and starts the hold period again, as does
// any correction the stream makes. The phase ends after a whole clean pass
// and a hold period without mismatches or corrections.
func (d *Daemon) verify(ctx context.Context, st *State) error {
	if err := d.startPipeline(ctx); err != nil {
		return err
	}
	throttle := snapshot.NewThrottle(snapshot.ThrottleConfig{
		MaxRowsPerSecond: d.cfg.Backfill.MaxRowsPerSecond,
		MaxReplicaLag:    d.cfg.Throttle.MaxReplicaLag,
		MaxSlotLag:       d.cfg.Throttle.MaxSlotLag,
		Slot:             d.cfg.SlotName(),
	}, d.pool, d.paused.Load)
	d.live.mu.Lock()
	d.live.throttleReason = throttle.Reason
	d.live.mu.Unlock()
	if st.CleanSince == nil {
		if err := d.store.Update(ctx, d.conn, "clean_since = now()"); err != nil {
			return err
		}
	}
	d.log.Info("verify: checking parity over the whole table", "hold", d.cfg.ContractPolicy.Hold, "contract_policy", d.cfg.ContractPolicy.Mode)
	fixes := d.totalCorrections()
	saidNever := false
	var passHi recompute.Key // the highest key of the pass in hand
	return d.pipe.Load().guard(ctx, func(ctx context.Context) error {
		for ctx.Err() == nil {
			st, err := d.store.Load(ctx, d.conn)
			if err != nil {
				return err
			}
			if now := d.totalCorrections(); now != fixes {
				// The stream corrected rows: not everything dual-writes yet.
				fixes = now
				d.log.Info("verify: the stream corrected rows; the hold period starts again")
				if err := d.store.Update(ctx, d.conn, "clean_since = now()"); err != nil {
					return err
				}
				continue
			}
			held := st.CleanSince != nil && time.Since(*st.CleanSince) >= d.cfg.ContractPolicy.Hold
			cleanPass := st.CleanPassStarted != nil && st.CleanSince != nil && !st.CleanPassStarted.Before(*st.CleanSince)
			if held && cleanPass {
				if d.cfg.ContractPolicy.Mode == "never" {
					if !saidNever {
						d.log.Info("verify: parity holds; contract_policy.mode is never, so the migration stays in verify and drops nothing")
						saidNever = true
					}
				} else {
					return d.store.SetPhase(ctx, d.conn, Verify, Contract, map[string]any{
						"rows_checked": st.VerifyRowsChecked, "mismatches": st.VerifyMismatches})
				}
			}
			if cleanPass && st.VerifyCursor == nil {
				// A whole pass found nothing since the hold began: no need
				// to scan again unless a mismatch or a correction restarts
				// the hold; the stream keeps checking every change.
				if err := sleep(ctx, 500*time.Millisecond); err != nil {
					return nil
				}
				continue
			}
			if st.VerifyCursor == nil || passHi == nil {
				// A pass covers the keys that exist when it starts; rows
				// inserted later come through the stream.
				if passHi, err = d.table.HighestKey(ctx, d.conn); err != nil {
					return err
				}
				if passHi == nil {
					continue // empty table: nothing to check yet
				}
			}
			if err := d.verifyChunk(ctx, st, throttle, passHi); err != nil {
				return err
			}
			if err := sleep(ctx, d.cfg.Backfill.Sleep); err != nil {
				return nil
			}
		}
		return nil
	})
}

// verifyChunk checks the next chunk and saves its cursor and counts.
func (d *Daemon) verifyChunk(ctx context.Context, st *State, throttle *snapshot.Throttle, hi recompute.Key) error {
	size := d.cfg.Backfill.BatchSize
	if err := throttle.Wait(ctx, size); err != nil {
		return nil
	}
	if st.VerifyCursor == nil {
		if err := d.store.Update(ctx, d.conn, "verify_pass_started = now()"); err != nil {
			return err
		}
	}
	res, err := d.table.Check(ctx, d.conn, st.VerifyCursor, hi, size)
	if err != nil {
		return fmt.Errorf("verify chunk after %v: %w", st.VerifyCursor, err)
	}
	persistent, err := d.recheck(ctx, res.Skipped)
	if err != nil {
		return err
	}
	passDone := res.Scanned < int64(size)
	set := "verify_rows_checked = verify_rows_checked + $2, verify_mismatches = verify_mismatches + $3, verify_cursor = $4"
	args := []any{res.Scanned, int64(len(persistent)), []string(res.Last)}
	if passDone {
		args = []any{res.Scanned, int64(len(persistent)), nil}
		// A pass ends; it was clean if the hold was not restarted since it began.
		set += ", clean_pass_started = CASE WHEN clean_since <= verify_pass_started THEN verify_pass_started ELSE clean_pass_started END, verify_pass_started = NULL"
	}
	if len(persistent) > 0 {
		samples := make([]string, len(persistent))
		for i, k := range persistent {
			samples[i] = d.table.KeyString(k)
		}
		set += fmt.Sprintf(", clean_since = now(), mismatch_samples = ($5::text[] || mismatch_samples)[1:%d]", maxSamples)
		args = append(args, samples)
		d.log.Warn("verify: rows out of parity that the stream did not explain; repaired, hold restarts",
			"count", len(persistent), "keys", samples)
	}
	return d.store.Update(ctx, d.conn, set, args...)
}

// recheck waits until the stream has applied everything committed before
// now (a WAL position read after the chunk: any change the chunk saw
// committed before it), then recomputes each differing key; the ones the
// recompute still had to change are persistent mismatches (now repaired).
func (d *Daemon) recheck(ctx context.Context, keys []recompute.Key) ([]recompute.Key, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	lsn, err := d.insertLSN(ctx)
	if err != nil {
		return nil, err
	}
	if err := d.pipe.Load().waitApplied(ctx, lsn); err != nil {
		return nil, err
	}
	var persistent []recompute.Key
	for len(keys) > 0 {
		var held []recompute.Key
		for _, k := range keys {
			res, err := d.table.Keys(ctx, d.conn, []recompute.Key{k})
			if err != nil {
				return nil, fmt.Errorf("verify: repair %s: %w", d.table.KeyString(k), err)
			}
			if res.Corrected > 0 {
				persistent = append(persistent, k)
			}
			held = append(held, res.Skipped...)
		}
		if len(held) > 0 {
			// The application holds these rows: its commit will come
			// through the stream; check them again after it.
			if err := sleep(ctx, 100*time.Millisecond); err != nil {
				return nil, err
			}
		}
		keys = held
	}
	return persistent, nil
}

// insertLSN is the server's current WAL insert position: every transaction
// committed so far ends before it.
func (d *Daemon) insertLSN(ctx context.Context) (pglogrepl.LSN, error) {
	var at string
	if err := d.conn.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&at); err != nil {
		return 0, err
	}
	return pglogrepl.ParseLSN(at)
}
