package phases

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// verifyTick is how often verify proves parity and credits the hold.
const verifyTick = 500 * time.Millisecond

// verify proves parity while the application owns the new columns: one
// read-only pass over the whole table in key order, and the stream checking
// every row the application changes. A row out of parity is kept with both
// values, never overwritten, and holds the contract until the application
// fixes it or an operator accepts it; with detect auto it proves the
// detection premature and the migration goes back to sync instead.
//
// The hold counts only time proven clean: each tick reads the server's
// clock and WAL position and waits until the stream has checked everything
// before that position; the time between two such proofs, with no row
// found out of parity in between, is added. Time the daemon is down, or the
// stream behind, is never added, and a restarted daemon proves parity anew
// before it counts again.
func (d *Daemon) verify(ctx context.Context, st *state.Migration) error {
	if err := d.startPipeline(ctx); err != nil {
		return err
	}
	throttle := d.newThrottle("verify")
	d.log.Info("verify: the application owns the new columns; checking parity over the whole table",
		"hold", d.cfg.ContractPolicy.Hold, "contract_policy", d.cfg.ContractPolicy.Mode, "hold_proven", st.HoldProven)
	v := &verifyRun{throttle: throttle, found: d.parity.found.Load(), pass: verifyPass{sizer: snapshot.NewSizer(d.cfg.Backfill.BatchSize, d.cfg.Backfill.TargetBatchTime), parts: 1}}
	return d.repl.pipe.Load().guard(ctx, func(ctx context.Context) error {
		for ctx.Err() == nil {
			if done, err := d.verifyStep(ctx, v); done || err != nil {
				return err
			}
		}
		return nil
	})
}

// verifyRun is what one run of verify carries from step to step.
type verifyRun struct {
	throttle  *snapshot.Throttle
	mark      time.Time // the server's clock at the last proof of this run; zero: none yet
	found     uint64    // rows found out of parity (paritySink.found) as of the last proof
	saidNever bool
	built     bool // the indexes on new columns are valid
	pass      verifyPass
}

// verifyStep is one step of verify: build the indexes, read the rows kept
// out of parity, check a chunk of the pass, or prove the hold. done says
// that verify ends (moved on, or ctx ended) with err.
func (d *Daemon) verifyStep(ctx context.Context, v *verifyRun) (done bool, err error) {
	if !v.built {
		if v.built, err = d.indexesBuilt(ctx); err != nil || !v.built {
			return err != nil, err // the loop's condition ends it with ctx
		}
	}
	st, outstanding, err := d.loadAndRecheck(ctx)
	if err != nil {
		return true, err
	}
	if outstanding > 0 {
		if d.cfg.DualWrite.Detect == config.DetectAuto {
			return true, d.backToSync(ctx, state.Verify, outstanding)
		}
		if err := d.holdOutOfParity(ctx, st, v, outstanding); err != nil {
			return true, err
		}
	}
	if !st.PassDone {
		if err := d.verifyChunk(ctx, st, v.throttle, &v.pass); err != nil {
			return true, err
		}
		if outstanding == 0 {
			d.figures.waiting.Store(fmt.Sprintf("the verify pass: %d rows checked", st.VerifyRowsChecked))
		}
		return sleepOrEnd(ctx, d.cfg.Backfill.Sleep)
	}
	if outstanding > 0 {
		return sleepOrEnd(ctx, verifyTick)
	}
	return d.proveHold(ctx, st, v)
}

// sleepOrEnd sleeps for a step's pause; true when ctx ended meanwhile.
func sleepOrEnd(ctx context.Context, pause time.Duration) (bool, error) {
	return dbconn.Sleep(ctx, pause) != nil, nil
}

// holdOutOfParity stops the hold while rows are out of parity: nothing
// proven counts until none is left.
func (d *Daemon) holdOutOfParity(ctx context.Context, st *state.Migration, v *verifyRun, outstanding int64) error {
	v.mark = time.Time{}
	if st.HoldProven > 0 {
		if err := d.store.ResetHold(ctx, d.conn); err != nil {
			return err
		}
	}
	d.figures.waiting.Store(fmt.Sprintf("%d rows out of parity: the application must fix them, or an operator accept them (cdcbackfill approve --accept-mismatches); the hold starts once none is left", outstanding))
	d.rlog.Info("verify: rows out of parity hold the contract; the hold starts once none is left", "rows", outstanding)
	return nil
}

// proveHold proves parity up to now and credits the time since the last
// proof to the hold; once the hold is reached, verify moves to contract
// unless the policy, a pause or a statement on the old column keeps it.
func (d *Daemon) proveHold(ctx context.Context, st *state.Migration, v *verifyRun) (done bool, err error) {
	now, ok, err := d.repl.pipe.Load().proveClean(ctx, d.conn)
	if err != nil {
		return true, err
	}
	if !ok {
		v.mark = time.Time{}
		d.figures.waiting.Store("the stream to catch up, to prove parity up to now")
		return false, nil
	}
	if f := d.parity.found.Load(); f != v.found {
		// Rows were found out of parity since the last proof and
		// fixed since: the clean time starts over.
		v.found, v.mark = f, now
		d.rlog.Info("verify: rows were out of parity; the hold starts again")
		if err := d.restartHold(ctx); err != nil {
			return true, err
		}
		return false, nil
	}
	held, err := d.creditHold(ctx, st, v, now)
	if err != nil {
		return true, err
	}
	if held < d.cfg.ContractPolicy.Hold {
		d.figures.waiting.Store(fmt.Sprintf("the hold: parity proven for %s of %s", held.Round(time.Second), d.cfg.ContractPolicy.Hold))
	} else if moved, err := d.afterHold(ctx, st, v, held); moved || err != nil {
		return true, err
	}
	return sleepOrEnd(ctx, verifyTick)
}

// creditHold adds the time since the last proof of this run to the hold
// (the first proof of a hold takes the baseline of the statements that use
// the old column instead), and returns the hold proven so far.
func (d *Daemon) creditHold(ctx context.Context, st *state.Migration, v *verifyRun, now time.Time) (time.Duration, error) {
	held := st.HoldProven
	if !v.mark.IsZero() {
		if err := d.store.CreditHold(ctx, d.conn, now.Sub(v.mark)); err != nil {
			return 0, err
		}
		held += now.Sub(v.mark)
	} else if st.HoldProven == 0 {
		if err := d.startUsageWatch(ctx); err != nil {
			return 0, err
		}
	}
	v.mark = now
	return held, nil
}

// afterHold decides, with parity held for the whole hold, whether verify
// moves to contract now; moved says it did.
func (d *Daemon) afterHold(ctx context.Context, st *state.Migration, v *verifyRun, held time.Duration) (moved bool, err error) {
	switch {
	case d.cfg.ContractPolicy.Mode == config.ContractNever:
		d.figures.waiting.Store("nothing: parity holds, and contract_policy.mode is never")
		if !v.saidNever {
			d.log.Info("verify: parity holds; contract_policy.mode is never, so the migration stays in verify and drops nothing")
			v.saidNever = true
		}
		return false, nil
	case d.control.paused.Load():
		d.figures.waiting.Store("resume: parity holds, but the migration is paused (cdcbackfill resume)")
		return false, nil
	}
	blocked, err := d.oldColumnStillUsed(ctx, st)
	if err != nil || blocked {
		return false, err
	}
	return true, d.store.Move(ctx, d.conn, state.Verify, state.Contract, map[string]any{
		"rows_checked": st.VerifyRowsChecked, "hold_proven": held.String()})
}

// restartHold starts the hold over from now: nothing proven yet, and a new
// baseline of the statements that use the old column.
func (d *Daemon) restartHold(ctx context.Context) error {
	if err := d.store.ResetHold(ctx, d.conn); err != nil {
		return err
	}
	return d.startUsageWatch(ctx)
}

// proveClean reads the server's clock and WAL insert position and waits
// (boundedly) until the stream has checked everything committed before
// that position: parity held up to that clock time, since every change
// before it has been checked. ok is false when the stream did not get there.
func (p *pipeline) proveClean(ctx context.Context, q dbconn.Querier) (now time.Time, ok bool, err error) {
	var at string
	if err := q.QueryRow(ctx, "SELECT clock_timestamp(), pg_current_wal_insert_lsn()::text").Scan(&now, &at); err != nil {
		return now, false, fmt.Errorf("read the server's clock: %w", err)
	}
	lsn, err := pglogrepl.ParseLSN(at)
	if err != nil {
		return now, false, err
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := p.waitApplied(wctx, lsn); err != nil {
		if wctx.Err() != nil && ctx.Err() == nil {
			return now, false, nil
		}
		return now, false, err
	}
	return now, true, nil
}

// newThrottle bounds backfill and verify batches; it logs when it starts
// and stops holding them back, with the reason.
func (d *Daemon) newThrottle(what string) *snapshot.Throttle {
	th := snapshot.NewThrottle(snapshot.ThrottleConfig{
		MaxRowsPerSecond:   d.cfg.Backfill.MaxRowsPerSecond,
		MaxReplicaLag:      d.cfg.Throttle.MaxReplicaLag,
		MaxReplicaLagBytes: d.cfg.Throttle.MaxReplicaLagBytes,
		IgnoreSlots:        d.cfg.Throttle.IgnoreSlots,
		MaxSlotLag:         d.cfg.Throttle.MaxSlotLag,
		Slot:               d.cfg.SlotName(),
		Name:               what,
		Logger:             d.log,
	}, d.pool, d.control.paused.Load)
	d.figures.live.mu.Lock()
	d.figures.live.throttleReason = th.Reason
	d.figures.live.mu.Unlock()
	return th
}

// verifyPass is how the pass in hand is read.
type verifyPass struct {
	hi    recompute.Key   // the pass's highest key; nil: the next chunk starts a pass
	sizer *snapshot.Sizer // rows of the next chunk (split: key values per part)
	parts int             // connections checking a chunk at once (see spreadParts)
	first int64           // split: the pass's lowest key
}

// verifyChunk checks the next chunk of the pass, read-only, and saves its
// cursor and count. A row that differs is checked again once the stream
// has passed the position the chunk was read at, so a change the chunk saw
// half-way is judged as the stream judges it; one that still differs is
// reported to the check sink. Chunks are sized as backfill batches are, to
// backfill.target_batch_time: a read takes no row lock, so the bound is
// only on how long one statement runs. Where the key allows (see
// spreadParts) a chunk is checked in parts at once.
func (d *Daemon) verifyChunk(ctx context.Context, st *state.Migration, throttle *snapshot.Throttle, p *verifyPass) error {
	if st.VerifyCursor == nil || p.hi == nil {
		// A pass covers the keys that exist when it starts; rows inserted
		// later come through the stream.
		lo, hi, estimate, err := d.table.Bounds(ctx, d.conn)
		if err != nil {
			return err
		}
		if hi == nil {
			return d.store.VerifyChunk(ctx, d.conn, 0, nil) // empty table: nothing to check
		}
		p.hi = hi
		p.parts, p.first = spreadParts(d.cfg.Verify.Workers, d.table, lo, hi, estimate)
	}
	size := p.sizer.Size()
	if err := throttle.Wait(ctx, size*p.parts); err != nil {
		return nil
	}
	began := time.Now()
	var res recompute.Result
	var cursor recompute.Key // after the chunk; nil: the pass ended
	var err error
	if p.parts > 1 {
		res, cursor, err = checkSpread(ctx, d.pool, d.table, st.VerifyCursor, p)
	} else {
		res, err = d.table.Check(ctx, d.conn, st.VerifyCursor, p.hi, size)
		if res.Scanned == int64(size) {
			cursor = res.Last
		}
	}
	if err != nil {
		return fmt.Errorf("verify chunk after %v: %w", st.VerifyCursor, err)
	}
	if cursor != nil {
		// Only a full chunk tells the cost per row: the pass's last one is
		// short, its time per row below the true cost, and would grow the
		// next pass's first chunks past the target.
		p.sizer.Observe(time.Since(began))
	}
	if len(res.Skipped) > 0 {
		lsn, err := insertLSN(ctx, d.conn)
		if err != nil {
			return err
		}
		if err := d.repl.pipe.Load().waitApplied(ctx, lsn); err != nil {
			return err
		}
		found, err := d.table.CheckKeys(ctx, d.conn, res.Skipped)
		if err != nil {
			return fmt.Errorf("verify: check again %d rows: %w", len(res.Skipped), err)
		}
		if err := d.parity.Report(ctx, found, nil); err != nil {
			return err
		}
	}
	if cursor == nil {
		d.log.Info("verify: a whole pass over the table ended", "rows_checked", st.VerifyRowsChecked+res.Scanned, "connections", p.parts)
	}
	return d.store.VerifyChunk(ctx, d.conn, res.Scanned, cursor)
}

// spreadParts is how many connections check each chunk of a pass from lo
// to hi, and the pass's lowest key: verify.workers where the key is one
// integer column whose values are dense (at most twice as many values as
// rows), so a part of w values holds about w rows and at most w; else 1,
// and chunks are walked by keyset alone.
func spreadParts(workers int, t *recompute.Table, lo, hi recompute.Key, estimate int64) (parts int, first int64) {
	if workers <= 1 || !t.IntegerKey() {
		return 1, 0
	}
	l, err1 := strconv.ParseInt(lo[0], 10, 64)
	h, err2 := strconv.ParseInt(hi[0], 10, 64)
	if err1 != nil || err2 != nil || l <= math.MinInt64/4 || h >= math.MaxInt64/4 || float64(h-l) > 2*float64(estimate) {
		return 1, 0
	}
	return workers, l
}

// checkSpread checks, each part on its own connection at once, p.parts
// parts of p.sizer.Size() key values after cursor (nil: from the pass's
// first key) up to p.hi. A part of w values of a unique integer key holds at most w
// rows, so each is checked whole. It returns what the parts found together
// and the cursor after them (nil: p.hi was reached).
func checkSpread(ctx context.Context, pool *pgxpool.Pool, t *recompute.Table, cursor recompute.Key, p *verifyPass) (recompute.Result, recompute.Key, error) {
	last, _ := strconv.ParseInt(p.hi[0], 10, 64)
	base := p.first - 1 // keys after it: the first key on
	if cursor != nil {
		base, _ = strconv.ParseInt(cursor[0], 10, 64)
	}
	size := p.sizer.Size()
	results := make([]recompute.Result, p.parts)
	g, gctx := errgroup.WithContext(ctx)
	end := base
	for i := range p.parts {
		from := end
		if from >= last {
			break
		}
		end = min(from+int64(size), last)
		lo, hi := recompute.Key{strconv.FormatInt(from, 10)}, recompute.Key{strconv.FormatInt(end, 10)}
		g.Go(func() error {
			conn, err := pool.Acquire(gctx)
			if err != nil {
				return err
			}
			defer conn.Release()
			results[i], err = t.Check(gctx, conn, lo, hi, size)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return recompute.Result{}, nil, err
	}
	var res recompute.Result
	for _, r := range results {
		res.Scanned += r.Scanned
		res.Skipped = append(res.Skipped, r.Skipped...)
	}
	if end >= last {
		return res, nil, nil
	}
	return res, recompute.Key{strconv.FormatInt(end, 10)}, nil
}
