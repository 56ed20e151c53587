package snapshot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"sync"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// Range is one worker's share of the keys: after Lo (nil: from the start)
// up to Hi inclusive; Cursor is the last key done (nil: none yet).
type Range struct {
	Lo     recompute.Key `json:"lo"`
	Hi     recompute.Key `json:"hi"`
	Cursor recompute.Key `json:"cursor"`
	Done   bool          `json:"done"`
}

// SplitRanges divides the plan into up to n ranges. Only a single integer
// key is split (by value); any other key is walked by one worker.
func SplitRanges(t *recompute.Table, p Plan, n int) []Range {
	if p.Hi == nil {
		return []Range{{Done: true}}
	}
	if n <= 1 || !t.IntegerKey() {
		return []Range{{Hi: p.Hi}}
	}
	lo, ok1 := new(big.Int).SetString(p.Lo[0], 10)
	hi, ok2 := new(big.Int).SetString(p.Hi[0], 10)
	if !ok1 || !ok2 {
		return []Range{{Hi: p.Hi}}
	}
	span := new(big.Int).Sub(hi, lo)
	if span.Cmp(big.NewInt(int64(n))) < 0 {
		return []Range{{Hi: p.Hi}}
	}
	step := new(big.Int).Div(span, big.NewInt(int64(n)))
	var ranges []Range
	var prev recompute.Key // nil: from the start
	for i := 0; i < n; i++ {
		var end recompute.Key
		if i == n-1 {
			end = p.Hi
		} else {
			b := new(big.Int).Add(lo, new(big.Int).Mul(step, big.NewInt(int64(i+1))))
			end = recompute.Key{b.String()}
		}
		ranges = append(ranges, Range{Lo: prev, Hi: end})
		prev = end
	}
	return ranges
}

// Checkpoint saves a batch's progress inside the batch's transaction.
type Checkpoint func(ctx context.Context, tx pgx.Tx, worker int, r Range, res recompute.Result) error

// Backfiller walks ranges in keyset batches.
type Backfiller struct {
	Table           *recompute.Table
	BatchSize       int           // first batch
	TargetBatchTime time.Duration // 0: BatchSize stays fixed
	Sleep           time.Duration // between batches
	// LockTimeout bounds every lock wait of a batch (the table's lock, the
	// state row); a batch that times out is rolled back and tried again.
	LockTimeout time.Duration
	Throttle    *Throttle
	Checkpoint  Checkpoint
	Log         *slog.Logger
}

// Batch sizes stay within these bounds when adapting to the target time.
const (
	minBatch = 10
	maxBatch = 100000
)

// Run walks every range not done, one worker per range, each on its own
// connection (conns[i] for ranges[i]). When ctx ends, each worker finishes
// the batch in hand and Run returns nil: the cursors are saved.
func (b *Backfiller) Run(ctx context.Context, conns []*pgx.Conn, ranges []Range) error {
	var wg sync.WaitGroup
	errs := make([]error, len(ranges))
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for i := range ranges {
		if ranges[i].Done {
			continue
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if err := b.walk(wctx, conns[i], i, ranges[i]); err != nil {
				errs[i] = err
				cancel() // the first failure stops the other workers
			}
		}(i)
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (b *Backfiller) walk(ctx context.Context, conn *pgx.Conn, worker int, r Range) error {
	sizer := NewSizer(b.BatchSize, b.TargetBatchTime)
	for !r.Done {
		size := sizer.Size()
		if err := b.Throttle.Wait(ctx, size); err != nil {
			if ctx.Err() != nil {
				return nil // stopped between batches: nothing in hand
			}
			return fmt.Errorf("backfill worker %d: throttle: %w", worker, err)
		}
		took, commit, res, err := b.batch(ctx, conn, worker, &r, size)
		if dbconn.IsLockTimeout(err) {
			// Another session holds the table (DDL, LOCK TABLE) or the
			// state row: nothing was done; try again after a pause.
			if b.Log != nil {
				b.Log.Warn("backfill: a batch waited longer than ddl.lock_timeout for a lock; retrying", "worker", worker, "err", err)
			}
			if dbconn.Sleep(ctx, time.Second) != nil {
				return nil
			}
			continue
		}
		if err != nil {
			return err
		}
		next := sizer.Observe(took)
		if b.Log != nil {
			b.Log.Debug("backfill batch", "worker", worker, "rows", res.Scanned, "corrected", res.Corrected,
				"skipped", len(res.Skipped), "took", took, "commit", commit, "next_size", next)
		}
		if r.Done || ctx.Err() != nil {
			return nil
		}
		if err := dbconn.Sleep(ctx, b.Sleep); err != nil {
			return nil
		}
	}
	return nil
}

// batch runs one batch and its checkpoint in one transaction, and returns
// how long it took, of which commit is the COMMIT's share. It runs to its
// end even when ctx ends (SIGTERM finishes the batch in hand), bounded by
// its own time-out.
//
// The batch commits asynchronously (synchronous_commit off for its
// transaction only): its rows and its cursor commit together, so a server
// crash that loses the last batches loses their cursor with them and the
// daemon does them again, while the batch no longer waits, holding its row
// locks, for the WAL flush of every commit (make bench-long measured what
// it bought). The stream sees only flushed WAL either way, and the daemon's
// phase changes and the hand-over still commit durably (state.Store).
func (b *Backfiller) batch(ctx context.Context, conn *pgx.Conn, worker int, r *Range, size int) (took, commit time.Duration, res recompute.Result, err error) {
	bctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute+10*b.TargetBatchTime)
	defer cancel()
	start := time.Now()
	// One round trip: pgx sends a query without arguments by the simple
	// protocol, which runs both statements.
	tx, err := conn.BeginTx(bctx, pgx.TxOptions{BeginQuery: "BEGIN; SET LOCAL synchronous_commit = off"})
	if err != nil {
		return 0, 0, res, fmt.Errorf("backfill worker %d: begin: %w", worker, err)
	}
	defer tx.Rollback(context.Background())
	lo := r.Cursor
	if lo == nil {
		lo = r.Lo
	}
	res, err = b.rangeBatch(bctx, tx, lo, r.Hi, size)
	if err != nil {
		tx.Rollback(context.Background())
		return 0, 0, res, b.explain(bctx, conn, lo, r.Hi, size, err)
	}
	next := *r
	if res.Last != nil {
		next.Cursor = res.Last
	}
	next.Done = res.Scanned < int64(size)
	if err := b.Checkpoint(bctx, tx, worker, next, res); err != nil {
		return 0, 0, res, fmt.Errorf("backfill worker %d: save cursor: %w", worker, err)
	}
	committing := time.Now()
	if err := tx.Commit(bctx); err != nil {
		return 0, 0, res, fmt.Errorf("backfill worker %d: commit batch: %w", worker, err)
	}
	*r = next
	return time.Since(start), time.Since(committing), res, nil
}

// rangeBatch recomputes one batch. The fast path is one UPDATE of the
// range; only when the application holds a row of it (lock_timeout) does
// the batch start over with rows locked ahead, passing over held rows
// (SKIP LOCKED) and returning them to retry. Locking ahead costs a write
// per row, so it is paid only where there is contention.
func (b *Backfiller) rangeBatch(ctx context.Context, tx pgx.Tx, lo, hi recompute.Key, size int) (recompute.Result, error) {
	if _, err := tx.Exec(ctx, "SAVEPOINT cdcb_fast"); err != nil {
		return recompute.Result{}, err
	}
	if err := dbconn.SetLockTimeout(ctx, tx, recompute.FastLockTimeout, true); err != nil {
		return recompute.Result{}, err
	}
	res, err := b.Table.FastRange(ctx, tx, lo, hi, size)
	lt := b.LockTimeout
	if lt <= 0 {
		lt = 2 * time.Second
	}
	if err == nil {
		return res, dbconn.SetLockTimeout(ctx, tx, lt, true)
	}
	if !dbconn.IsLockTimeout(err) {
		return res, err
	}
	if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT cdcb_fast"); err != nil {
		return recompute.Result{}, err
	}
	// SKIP LOCKED passes over held rows, but the statement can still queue
	// behind a lock on the table: bounded too.
	if err := dbconn.SetLockTimeout(ctx, tx, lt, true); err != nil {
		return recompute.Result{}, err
	}
	return b.Table.Range(ctx, tx, lo, hi, size)
}

// explain turns a failed batch into an error a user can act on: when an
// expression fails on a row, it names the row's key.
func (b *Backfiller) explain(ctx context.Context, conn *pgx.Conn, lo, hi recompute.Key, size int, err error) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || !pgerrcode.IsDataException(pgErr.Code) && !pgerrcode.IsIntegrityConstraintViolation(pgErr.Code) {
		return fmt.Errorf("backfill batch after key %v: %w", lo, err)
	}
	key, col, ferr := b.Table.FindFailingRow(ctx, conn, lo, hi, size)
	if ferr != nil || key == nil {
		return fmt.Errorf("backfill batch after key %v: %w", lo, err)
	}
	return fmt.Errorf("expression for column %s fails on the row with key %s: %s (SQLSTATE %s); fix the expression (columns.%s) or the row, then run again",
		col, b.Table.KeyString(key), pgErr.Message, pgErr.Code, col)
}
