package applier

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/cdc"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// Defaults for the zero values of Config.
const (
	DefaultFlushInterval = 50 * time.Millisecond
	DefaultMaxBatchKeys  = 5000
	// DefaultMaxDeferredKeys bounds the deferred mode's buffer.
	DefaultMaxDeferredKeys = 100000
	DefaultStopTimeout     = 10 * time.Second
	DefaultLockTimeout     = 2 * time.Second
)

// sourceMemory bounds the keys whose last source image the applier
// remembers, to tell an UPDATE of the source columns from one of others.
const sourceMemory = 1 << 16

// ErrStopped is returned by WaitApplied once Run has returned.
var ErrStopped = errors.New("applier stopped")

// ErrForeignRelation is what Run's error wraps when the stream delivers a
// change of a table other than the migrated one. The publication holds only
// that table, so the publication or the table was changed under the daemon;
// reconnecting delivers the same change again, so it is not worth a retry.
var ErrForeignRelation = errors.New("change of a table other than the migrated one")

// foreignRelationError names the relation; it is ErrForeignRelation.
type foreignRelationError struct{ relation, table string }

func (e *foreignRelationError) Error() string {
	return fmt.Sprintf("stream delivered changes of %s, which is not the migrated table %s: "+
		"the publication was changed (or the table renamed or replaced); the slot stays before that "+
		"transaction: make the publication hold only %s again, or abort the migration", e.relation, e.table, e.table)
}

func (e *foreignRelationError) Unwrap() error { return ErrForeignRelation }

// Config says how keys are batched.
type Config struct {
	FlushInterval time.Duration // longest a key waits in the buffer; also the back-off when every key is held
	MaxBatchKeys  int           // buffer size and keys per statement
	// StopTimeout is how long Run may go on after its context ends, to
	// finish the statement in hand and flush the buffer once more; default
	// 10s. Keys still unapplied then are replayed after a restart.
	StopTimeout time.Duration
	// LockTimeout bounds the wait of the statement that locks rows ahead
	// (it passes over held rows, but can still queue behind a lock on the
	// table); a time-out ends Run and the pipeline replays. Default 2s.
	LockTimeout time.Duration
	// Checks receives what the applier finds once the application owns the
	// new columns (see SetHandover); required before then.
	Checks Checks
	// Gate, when set, closes every correction at the hand-over recorded in
	// the state row: a statement that finds it recorded writes nothing,
	// and the applier hands over at that position itself, whenever the
	// conductor notices. Nil: only SetHandover hands over.
	Gate *recompute.Gate
	// Defer, when positive, is the deferred mode: while the expressions own
	// the new columns a changed key waits up to Defer before its correction.
	// Until dual-write nobody reads the new columns, so their freshness is
	// traded for the application's capacity: repeated changes of a key
	// coalesce into one correction, and corrections run in key order, in
	// statements of up to statementKeys, paced by Pace. The confirmed
	// position stays behind the oldest waiting change, so the slot keeps
	// the WAL to replay them after a crash. Hurry and the hand-over end the
	// wait.
	Defer time.Duration
	// MaxDeferredKeys bounds the keys waiting in the deferred mode (memory:
	// about 200 bytes a key); a full buffer is corrected at once.
	MaxDeferredKeys int
	// Pace, when set, runs before each statement of a deferred correction,
	// with its number of keys; an error ends Run.
	Pace   func(ctx context.Context, keys int) error
	Logger *slog.Logger // may be nil
}

// Checks is told what the applier finds while the application owns the new
// columns.
type Checks interface {
	// Report gets, after each check, the rows found out of parity (with both
	// values) and the keys found in parity (which clears earlier reports of
	// them). The confirmed position passes those keys only once Report has
	// returned nil; an error ends Run, and the keys replay.
	Report(ctx context.Context, found []recompute.Mismatch, clean []recompute.Key) error
}

// Applier applies the keys of one table. Run it once; the other methods are
// safe for concurrent use.
type Applier struct {
	conn     *pgx.Conn
	table    *recompute.Table
	relation string // "schema.table", as cdc names it
	cfg      Config
	log      *slog.Logger

	// Read by other goroutines.
	confirmed     atomic.Uint64
	events        atomic.Uint64
	corrections   atomic.Uint64
	flushes       atomic.Uint64
	retries       atomic.Uint64
	lockedFlushes atomic.Uint64
	visWaits      atomic.Uint64
	commitTime    atomic.Int64 // unix nanoseconds, 0 for none
	pendingKeys   atomic.Int64
	evidence      atomic.Uint64
	correctedAt   atomic.Int64 // unix nanoseconds: LastCorrectionTime
	streamTime    atomic.Int64 // unix nanoseconds: StreamTime
	checked       atomic.Uint64
	mismatches    atomic.Uint64
	handover      atomic.Uint64 // LSN from which the application owns the new columns; 0: none
	running       atomic.Bool
	hurry         atomic.Bool   // Hurry was called: apply the buffer now
	wake          chan struct{} // Hurry wakes the Run goroutine through it
	stopped       chan struct{} // closed when Run returns
	ctl           chan func()   // run by the Run goroutine between events and flushes

	mu       sync.Mutex
	advanced chan struct{} // closed and replaced whenever confirmed moves
	recent   []string      // RecentCorrections, under mu

	// Owned by the Run goroutine.
	buf         map[string]*bufferedKey
	xids        map[uint32]struct{} // transactions that put keys in buf since the last flush's visibility check
	minLSN      pglogrepl.LSN       // smallest lsn in buf, when buf is not empty
	minTime     time.Time           // commit time that goes with minLSN
	inFlight    bool                // a Begin was seen without its Commit
	txLSN       pglogrepl.LSN       // FinalLSN of the transaction in flight
	txTime      time.Time
	lastEnd     pglogrepl.LSN     // highest Commit or Idle EndLSN seen
	lastCommit  time.Time         // commit time of the last Commit seen
	contended   bool              // the last locking statement passed over held rows
	fastTimeout bool              // the session's lock_timeout is recompute.FastLockTimeout (else Config.LockTimeout)
	timeoutSet  bool              // the session's lock_timeout was set
	due         time.Time         // when the buffer must be flushed
	backoff     bool              // the last flush applied nothing: wait for due even when full
	keyCols     []string          // KeyColumns of the last Change mapped
	keyIdx      []int             // keyIdx[i] is where t.Key[i] sits in those KeyColumns
	keyInOrder  bool              // those KeyColumns are t.Key, in order: a Change's Key is the key
	held        bool              // Hold: no flush until Release
	sources     map[string]uint64 // last source image hash seen per key, at most sourceMemory
}

// New returns an Applier writing table through conn, which it uses alone
// while Run runs (the caller may have set a replication origin on it and
// closes it afterwards).
func New(conn *pgx.Conn, table *recompute.Table, cfg Config) *Applier {
	if cfg.FlushInterval <= 0 {
		cfg.FlushInterval = DefaultFlushInterval
	}
	if cfg.MaxBatchKeys <= 0 {
		cfg.MaxBatchKeys = DefaultMaxBatchKeys
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = DefaultStopTimeout
	}
	if cfg.MaxDeferredKeys <= 0 {
		cfg.MaxDeferredKeys = DefaultMaxDeferredKeys
	}
	if cfg.LockTimeout <= 0 {
		cfg.LockTimeout = DefaultLockTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	relation := table.Schema + "." + table.Name
	return &Applier{
		conn:     conn,
		table:    table,
		relation: relation,
		cfg:      cfg,
		log:      log.With("table", relation),
		stopped:  make(chan struct{}),
		ctl:      make(chan func()),
		wake:     make(chan struct{}, 1),
		advanced: make(chan struct{}),
		buf:      make(map[string]*bufferedKey, cfg.MaxBatchKeys),
		xids:     make(map[uint32]struct{}),
		sources:  make(map[string]uint64),
	}
}

// Hurry has the buffered keys applied now, rather than when their flush
// interval or deferral ends: someone waits on WaitApplied.
func (a *Applier) Hurry() {
	a.hurry.Store(true)
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// do runs f on the Run goroutine, between events and flushes, and waits for
// it.
func (a *Applier) do(ctx context.Context, f func()) error {
	done := make(chan struct{})
	select {
	case a.ctl <- func() { f(); close(done) }:
	case <-a.stopped:
		return ErrStopped
	case <-ctx.Done():
		return ctx.Err()
	}
	<-done // f is short and runs at once
	return nil
}

// Hold stops flushing: when it returns no statement of the applier runs,
// and none starts until Release. Events are still taken into the buffer,
// up to its size. The cut-over holds the applier while it has the table
// locked and checks the buffered keys itself.
func (a *Applier) Hold(ctx context.Context) error {
	return a.do(ctx, func() { a.held = true })
}

// Release undoes Hold.
func (a *Applier) Release(ctx context.Context) error {
	return a.do(ctx, func() {
		a.held = false
		a.due = time.Now()
	})
}

// Discard empties the buffer and holds the applier for good: after the
// contract DDL the keys no longer matter (the slot is dropped next) and a
// statement would fail on the dropped column.
func (a *Applier) Discard(ctx context.Context) error {
	return a.do(ctx, func() {
		a.held = true
		clear(a.buf)
		clear(a.xids)
		a.pendingKeys.Store(0)
	})
}

// Run applies the events of in until in is closed or ctx ends, and returns
// nil then. Either way it first finishes the batch in hand and flushes what
// is buffered once more, so ConfirmedLSN covers it when Run returns: the
// recompute statements do not run on ctx but on a context that ends
// StopTimeout after ctx does, and Run reads no more input once ctx has
// ended. It returns the first error of a recompute statement, wrapped as
// "apply keys: ...", of a Change it cannot map to the table's key, or
// ErrForeignRelation for a Change of another table. A statement cut off by
// StopTimeout is not an error: its keys replay. Run may be called once.
//
// Cancel ctx before the stream's context and wait for Run to return before
// cancelling the stream (see the package documentation).
func (a *Applier) Run(ctx context.Context, in <-chan cdc.Event) error {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("applier: Run called twice")
	}
	defer close(a.stopped)
	wctx, release := a.workContext(ctx)
	defer release()
	err := a.run(ctx, wctx, in)
	if err != nil && wctx.Err() != nil {
		// StopTimeout cut off the statement in hand: a shutdown, not a failure.
		a.log.Warn("stop timeout reached before the buffer was applied; its keys replay after a restart",
			"stop_timeout", a.cfg.StopTimeout, "pending_keys", len(a.buf), "confirmed", a.ConfirmedLSN(), "err", err)
		return nil
	}
	if err != nil {
		a.log.Error("applier stopped", "err", err, "pending_keys", len(a.buf), "confirmed", a.ConfirmedLSN())
	}
	return err
}

// workContext returns the context of the recompute statements: it has ctx's
// values and ends StopTimeout after ctx ends, or when release is called.
func (a *Applier) workContext(ctx context.Context) (wctx context.Context, release func()) {
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() { time.AfterFunc(a.cfg.StopTimeout, cancel) })
	return wctx, func() {
		stop()
		cancel()
	}
}

// finish is the last flush after ctx ended: whatever the buffer holds is
// applied on wctx, so the confirmed position reflects the batch in hand.
func (a *Applier) finish(wctx context.Context) error {
	if len(a.buf) == 0 || a.held {
		// Held: the cut-over owns the table (a statement would wait on its
		// lock, or find the old column dropped); the keys replay.
		return nil
	}
	began, keys := time.Now(), len(a.buf)
	if err := a.flush(wctx); err != nil {
		return err
	}
	a.log.Info("stopping: applied the buffered keys", "keys", keys, "held", len(a.buf),
		"took", time.Since(began), "confirmed", a.ConfirmedLSN())
	return nil
}

// run is Run's loop. It stops reading input when ctx ends; statements run on
// wctx (see workContext).
func (a *Applier) run(ctx, wctx context.Context, in <-chan cdc.Event) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var armed time.Time // the due the timer is set for, zero when stopped

	for {
		// Many transactions on few keys fill the xid set, not the buffer: it
		// is bounded by the same size (a flush empties it).
		if ctx.Err() != nil {
			return a.finish(wctx)
		}
		if a.hurry.Swap(false) && len(a.buf) > 0 {
			a.due, a.backoff = time.Now(), false
		}
		limit := a.bufferLimit()
		full := len(a.buf) >= limit || len(a.xids) >= limit
		if full && !a.backoff && !a.held {
			if err := a.flush(wctx); err != nil {
				return err
			}
			continue
		}
		var timerC <-chan time.Time
		if len(a.buf) > 0 && !a.held {
			if !armed.Equal(a.due) {
				timer.Reset(time.Until(a.due))
				armed = a.due
			}
			timerC = timer.C
		} else if !armed.IsZero() {
			timer.Stop()
			armed = time.Time{}
		}
		input := in
		if full {
			// Held keys fill the buffer: read nothing more until the retry.
			input = nil
		}

		select {
		case <-ctx.Done():
			return a.finish(wctx)
		case f := <-a.ctl:
			f()
		case <-a.wake: // a Hurry: the loop's top takes it
		case <-timerC:
			armed = time.Time{}
			if err := a.flush(wctx); err != nil {
				return err
			}
		case ev, ok := <-input:
			if !ok {
				if len(a.buf) > 0 && !a.held {
					return a.flush(wctx)
				}
				return nil
			}
			if err := a.handle(wctx, ev); err != nil {
				return err
			}
		}
	}
}
