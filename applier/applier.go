package applier

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/cdc"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
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

// Stats are the applier's counters since New.
type Stats struct {
	Events      uint64 // events received, of any kind and relation
	Corrections uint64 // rows whose new columns were written
	Flushes     uint64 // recompute rounds over the buffer
	Retries     uint64 // keys found held by another transaction, kept for the next flush (one per key per flush)
	// LockedFlushes counts statements that locked rows ahead: a row was
	// held past recompute.FastLockTimeout, or held rows were being passed over.
	LockedFlushes uint64
	// VisibilityWaits counts flushes that found a transaction of their keys
	// committed in WAL but still running (not yet visible to a snapshot) and
	// waited for it before recomputing.
	VisibilityWaits uint64
	ConfirmedLSN    pglogrepl.LSN // as ConfirmedLSN
	// LastCommitTime is the commit time of the last transaction fully
	// applied when nothing waits, else of the oldest transaction with keys
	// still waiting: time.Since(LastCommitTime) is how old the oldest
	// unapplied change is. Zero before the first transaction.
	LastCommitTime time.Time
	PendingKeys    int // keys in the buffer
	// RecentCorrections are a few of the last keys whose new columns the
	// applier had to write, newest first: where the application does not
	// (yet) dual-write as the expressions say.
	RecentCorrections []string
	// Evidence counts application changes that show it writing the new
	// columns itself (an insert that set them, an update that changed a
	// source column) and whose rows needed no correction: counted per
	// statement, only where the statement corrected nothing.
	Evidence uint64
	// LastCorrectionTime is the commit time of the latest transaction in a
	// statement that had to correct rows (zero: none yet).
	LastCorrectionTime time.Time
	// StreamTime is the commit time of the last transaction received.
	StreamTime time.Time
	// Checked and Mismatches count the keys checked, and found out of
	// parity, while the application owns the new columns.
	Checked, Mismatches uint64
	// Handover is the position from which the application owns the new
	// columns (0: the expressions own them).
	Handover pglogrepl.LSN
	// Deferring: corrections wait up to Config.Defer (the deferred mode,
	// before the hand-over); PendingKeys is then the backlog, and
	// LastCommitTime its oldest change.
	Deferring bool
}

// maxRecent bounds Stats.RecentCorrections.
const maxRecent = 10

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
	buf         map[string]*pending
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

// pending is a buffered key and the earliest transaction that changed it.
type pending struct {
	key  recompute.Key
	lsn  pglogrepl.LSN // FinalLSN (commit LSN) of that transaction
	time time.Time     // its commit time, zero when unknown
	// Of the latest transaction that changed the key: its commit LSN, time
	// and xid (the hand-over decides by them who owns the row).
	lastLSN  pglogrepl.LSN
	lastTime time.Time
	lastXid  uint32
	evidence bool // some change of the key shows the application writing the new columns
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
		buf:      make(map[string]*pending, cfg.MaxBatchKeys),
		xids:     make(map[uint32]struct{}),
		sources:  make(map[string]uint64),
	}
}

// SetConfirmed sets the starting position, the slot's confirmed_flush_lsn,
// before Run. The position never moves backwards.
func (a *Applier) SetConfirmed(lsn pglogrepl.LSN) { a.raiseConfirmed(lsn) }

// ConfirmedLSN is the position the slot may be confirmed to: every
// transaction committed before it has all its keys applied.
func (a *Applier) ConfirmedLSN() pglogrepl.LSN { return pglogrepl.LSN(a.confirmed.Load()) }

// Stats returns the counters.
func (a *Applier) Stats() Stats {
	st := Stats{
		Events:          a.events.Load(),
		Corrections:     a.corrections.Load(),
		Flushes:         a.flushes.Load(),
		Retries:         a.retries.Load(),
		LockedFlushes:   a.lockedFlushes.Load(),
		VisibilityWaits: a.visWaits.Load(),
		ConfirmedLSN:    a.ConfirmedLSN(),
		PendingKeys:     int(a.pendingKeys.Load()),
	}
	if ns := a.commitTime.Load(); ns != 0 {
		st.LastCommitTime = time.Unix(0, ns)
	}
	if ns := a.correctedAt.Load(); ns != 0 {
		st.LastCorrectionTime = time.Unix(0, ns)
	}
	if ns := a.streamTime.Load(); ns != 0 {
		st.StreamTime = time.Unix(0, ns)
	}
	st.Evidence, st.Checked, st.Mismatches = a.evidence.Load(), a.checked.Load(), a.mismatches.Load()
	st.Handover = pglogrepl.LSN(a.handover.Load())
	st.Deferring = a.deferring()
	a.mu.Lock()
	st.RecentCorrections = slices.Clone(a.recent)
	a.mu.Unlock()
	return st
}

// WaitApplied blocks until ConfirmedLSN() >= lsn: every transaction committed
// before lsn is applied. It returns ctx's error, or ErrStopped once Run has
// returned without getting there.
func (a *Applier) WaitApplied(ctx context.Context, lsn pglogrepl.LSN) error {
	for {
		a.mu.Lock()
		advanced := a.advanced
		a.mu.Unlock()
		// Read after taking the channel: a raise in between closes it.
		if a.ConfirmedLSN() >= lsn {
			return nil
		}
		select {
		case <-advanced:
		case <-a.stopped:
			if a.ConfirmedLSN() >= lsn {
				return nil
			}
			return fmt.Errorf("wait for %s to be applied: %w at %s", lsn, ErrStopped, a.ConfirmedLSN())
		case <-ctx.Done():
			return fmt.Errorf("wait for %s to be applied (at %s): %w", lsn, a.ConfirmedLSN(), ctx.Err())
		}
	}
}

// SetHandover says who owns the new columns: from position lsn on the
// application does, and the applier only checks keys and reports them to
// Config.Checks (keys whose latest change came before lsn are still
// corrected where their row is unchanged since); lsn 0 gives the new columns
// back to the expressions (a hand-over found premature).
func (a *Applier) SetHandover(lsn pglogrepl.LSN) {
	a.handover.Store(uint64(lsn))
	a.Hurry() // keys deferred until now are the expressions' still: correct them
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

// deferring says whether corrections wait up to Config.Defer now.
func (a *Applier) deferring() bool { return a.cfg.Defer > 0 && a.handover.Load() == 0 }

// bufferLimit is how many keys (and transactions) the buffer holds before
// it is flushed however young they are.
func (a *Applier) bufferLimit() int {
	if a.deferring() {
		return a.cfg.MaxDeferredKeys
	}
	return a.cfg.MaxBatchKeys
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

// PendingThrough returns the buffered keys once every transaction
// committed before lsn has been received and none is in flight; until then
// it polls, calling wait between looks, until ctx ends. Call it while held.
func (a *Applier) PendingThrough(ctx context.Context, lsn pglogrepl.LSN, wait func()) ([]recompute.Key, error) {
	for {
		var keys []recompute.Key
		ready := false
		err := a.do(ctx, func() {
			if a.inFlight || a.lastEnd < lsn {
				return
			}
			ready = true
			keys = make([]recompute.Key, 0, len(a.buf))
			for _, p := range a.buf {
				keys = append(keys, p.key)
			}
		})
		if err != nil {
			return nil, err
		}
		if ready {
			return keys, nil
		}
		wait()
		t := time.NewTimer(2 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

func (a *Applier) raiseConfirmed(lsn pglogrepl.LSN) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if uint64(lsn) <= a.confirmed.Load() {
		return
	}
	a.confirmed.Store(uint64(lsn))
	close(a.advanced)
	a.advanced = make(chan struct{})
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

// handle takes one event into the buffer and the transaction state.
func (a *Applier) handle(ctx context.Context, ev cdc.Event) error {
	a.events.Add(1)
	switch ev.Kind {
	case cdc.Begin:
		a.inFlight, a.txLSN, a.txTime = true, ev.FinalLSN, ev.CommitTime
	case cdc.Change:
		if ev.Relation != a.relation {
			// Ignoring it would confirm past a change of a table the
			// publication should not hold: stop before confirming anything
			// of this transaction (it is in flight, which holds confirmed).
			return &foreignRelationError{relation: ev.Relation, table: a.relation}
		}
		key, err := a.tableKey(ev)
		if err != nil {
			return err
		}
		var t time.Time
		if a.inFlight && ev.FinalLSN == a.txLSN {
			t = a.txTime
		}
		a.add(key, ev.FinalLSN, t, ev.Xid, a.isEvidence(key, ev.Image))
		if ev.Xid != 0 {
			a.xids[ev.Xid] = struct{}{}
		}
		return nil // the buffer only grew: confirmed cannot move
	case cdc.Commit:
		a.inFlight = false
		a.lastEnd = max(a.lastEnd, ev.EndLSN)
		a.lastCommit = ev.CommitTime
		a.streamTime.Store(ev.CommitTime.UnixNano())
		if len(a.buf) > 0 && !a.held && !time.Now().Before(a.due) {
			return a.flush(ctx)
		}
	case cdc.Idle:
		a.lastEnd = max(a.lastEnd, ev.EndLSN)
		if len(a.buf) > 0 && !a.held && !time.Now().Before(a.due) {
			return a.flush(ctx)
		}
	case cdc.Reset:
		// The transaction in flight will be sent again from its Begin; keys
		// it already gave stay buffered, which is harmless.
		a.inFlight = false
	}
	a.advance()
	return nil
}

// tableKey maps a Change's key, given in relation column order, to the
// table's primary key order.
func (a *Applier) tableKey(ev cdc.Event) (recompute.Key, error) {
	if len(ev.Key) != len(ev.KeyColumns) {
		return nil, fmt.Errorf("change of %s: %d key values for key columns %v", ev.Relation, len(ev.Key), ev.KeyColumns)
	}
	if !slices.Equal(ev.KeyColumns, a.keyCols) {
		idx := make([]int, len(a.table.Key))
		for i, k := range a.table.Key {
			idx[i] = slices.Index(ev.KeyColumns, k.Name)
			if idx[i] < 0 {
				return nil, fmt.Errorf("change of %s: replica identity columns %v lack primary key column %q",
					ev.Relation, ev.KeyColumns, k.Name)
			}
		}
		a.keyCols, a.keyIdx = ev.KeyColumns, idx
		a.keyInOrder = len(idx) == len(ev.KeyColumns)
		for i, j := range idx {
			a.keyInOrder = a.keyInOrder && i == j
		}
	}
	if a.keyInOrder {
		return ev.Key, nil // the event's own slice: no copy per change
	}
	key := make(recompute.Key, len(a.keyIdx))
	for i, j := range a.keyIdx {
		key[i] = ev.Key[j]
	}
	return key, nil
}

// isEvidence says whether a change shows the application writing the new
// columns itself: an insert that set them, or an update that changed a
// source column (known from the old row version where the server sends it,
// else from the source image last seen for the key). An update of other
// columns says nothing: the row was in parity before and stays so whoever
// wrote it.
func (a *Applier) isEvidence(key recompute.Key, im cdc.Image) bool {
	if im.Source == 0 {
		return im.Op == cdc.OpInsert && im.Written
	}
	c := key.ID()
	prev, seen := a.sources[c]
	if !seen && len(a.sources) >= sourceMemory {
		for k := range a.sources { // forget one, any one
			delete(a.sources, k)
			break
		}
	}
	a.sources[c] = im.Source
	switch im.Op {
	case cdc.OpInsert:
		return im.Written
	case cdc.OpUpdate:
		if im.OldSource != 0 {
			return im.OldSource != im.Source
		}
		return seen && prev != im.Source
	}
	return false
}

// add buffers key for the transaction committed at lsn, keeping the earliest
// transaction of a key already there.
func (a *Applier) add(key recompute.Key, lsn pglogrepl.LSN, t time.Time, xid uint32, evidence bool) {
	c := key.ID()
	if p, ok := a.buf[c]; ok {
		// Only a replay after Reset brings an earlier transaction.
		if lsn < p.lsn {
			p.lsn, p.time = lsn, t
		}
		if lsn >= p.lastLSN {
			p.lastLSN, p.lastTime, p.lastXid = lsn, t, xid
		}
		p.evidence = p.evidence || evidence
	} else {
		if len(a.buf) == 0 {
			wait := a.cfg.FlushInterval
			if a.deferring() {
				wait = a.cfg.Defer
			}
			a.due = time.Now().Add(wait)
		}
		a.buf[c] = &pending{key: key, lsn: lsn, time: t, lastLSN: lsn, lastTime: t, lastXid: xid, evidence: evidence}
		a.pendingKeys.Store(int64(len(a.buf)))
	}
	if len(a.buf) == 1 || lsn < a.minLSN {
		a.minLSN, a.minTime = lsn, t
	}
}

// advance raises the confirmed position as far as the state allows: the end
// of the last commit when nothing is pending, else the earliest commit LSN
// pending, which the server sends again after a restart.
func (a *Applier) advance() {
	target, t := a.lastEnd, a.lastCommit
	if len(a.buf) > 0 || a.inFlight {
		target, t = pglogrepl.LSN(^uint64(0)), time.Time{}
		if len(a.buf) > 0 {
			target, t = a.minLSN, a.minTime
		}
		if a.inFlight && a.txLSN < target {
			target, t = a.txLSN, a.txTime
		}
	}
	// A replay after a reconnect brings transactions below confirmed again:
	// they were applied before confirmed passed them, so confirmed stays.
	if target < a.ConfirmedLSN() {
		return
	}
	a.raiseConfirmed(target)
	if !t.IsZero() {
		a.commitTime.Store(t.UnixNano())
	}
}

// statementKeys bounds the keys of one recompute statement. A statement
// holds the row locks of what it has updated until it commits, and the
// application's writes to those rows wait. With durable commits a
// statement's time is mostly its commit's WAL flush, about the same for
// 100 keys as for 1000: each row is held about as long either way, and
// every statement saved is a WAL flush the application's commits no longer
// queue behind (make bench, PostgreSQL 15: 100 keys per statement left the
// application 0.66 of its no-migration capacity in sync; 1000, with the
// stream's longer gathering, 0.81). The bound keeps a burst of keys from
// holding thousands of rows at once.
const statementKeys = 1000

// flush recomputes every buffered key (or, once the application owns the
// new columns, checks it); held keys stay for the next flush.
//
// Its statements must see every transaction that put keys in the buffer
// (a.xids). The walsender sends a transaction as soon as its commit record
// is flushed, which may be before the committing backend has left the proc
// array: for microseconds normally, for the whole wait for a synchronous
// standby when synchronous replication is on. A statement whose snapshot is
// taken in that window still sees the row as it was before the transaction
// (an inserted row not at all), finds it in parity or missing, and the key
// would count as applied, the slot confirmed past a change never applied.
// Once a transaction is no longer running in one snapshot it is visible to
// every later one. Correcting, each statement reports its snapshot and runs
// again when needed (correct); checking, the statements report none, so a
// snapshot is polled first (waitVisible).
func (a *Applier) flush(ctx context.Context) error {
	begin := time.Now()
	entries := make([]*pending, 0, len(a.buf))
	for _, p := range a.buf {
		entries = append(entries, p)
	}
	unseen := slices.Collect(maps.Keys(a.xids))
	var corrected int64
	var held int
	var err error
	if h := pglogrepl.LSN(a.handover.Load()); h != 0 {
		corrected, held, err = a.checkAfterHandover(ctx, entries, unseen, h)
	} else {
		corrected, held, err = a.correct(ctx, entries, unseen)
		var ho *handedOver
		if errors.As(err, &ho) {
			// Handed over while correcting: what the earlier statements
			// wrote came before it; the rest of the buffer is checked.
			a.SetHandover(ho.lsn)
			a.log.Info("applier: the hand-over is recorded; from now on the daemon checks the new columns and never writes them", "handover_lsn", ho.lsn)
			var c int64
			var h int
			c, h, err = a.checkAfterHandover(ctx, slices.Collect(maps.Values(a.buf)), unseen, ho.lsn)
			corrected, held = corrected+c, held+h
		}
	}
	if err != nil {
		return err
	}
	clear(a.xids)
	a.flushes.Add(1)
	a.corrections.Add(uint64(corrected))
	a.retries.Add(uint64(held))
	a.pendingKeys.Store(int64(len(a.buf)))

	a.minLSN, a.minTime = 0, time.Time{}
	first := true
	for _, p := range a.buf {
		if first || p.lsn < a.minLSN {
			a.minLSN, a.minTime, first = p.lsn, p.time, false
		}
	}
	// Held keys wait one interval; a flush that applied nothing (every key
	// held) also stops a full buffer from flushing again before then.
	a.backoff = len(a.buf) > 0 && len(a.buf) >= len(entries)
	if len(a.buf) > 0 {
		a.due = time.Now().Add(a.cfg.FlushInterval)
	}
	a.advance()
	a.log.Debug("flushed keys", "keys", len(entries), "corrected", corrected, "held", held,
		"took", time.Since(begin), "confirmed", a.ConfirmedLSN())
	return nil
}

// correct recomputes entries while the expressions own the new columns,
// counting the evidence of dual-write in statements that corrected nothing.
//
// unseen are the buffer's transactions (see flush). Rather than a snapshot
// of its own first, a round trip per flush, each statement reports the
// snapshot it ran with; in the rare case one of unseen was still running in
// it, the statement runs again once they are visible. Once one statement's
// snapshot has them all, the later ones' snapshots do too.
func (a *Applier) correct(ctx context.Context, entries []*pending, unseen []uint32) (corrected int64, held int, err error) {
	deferred := a.deferring()
	if deferred {
		// Rows in index order: a statement's rows share pages, and the
		// bulk correction walks the table once.
		slices.SortFunc(entries, func(x, y *pending) int { return a.table.CompareKeys(x.key, y.key) })
	}
	for chunk := range slices.Chunk(entries, min(a.cfg.MaxBatchKeys, statementKeys)) {
		if deferred && a.cfg.Pace != nil {
			if err := a.cfg.Pace(ctx, len(chunk)); err != nil {
				return 0, 0, err
			}
		}
		keys := make([]recompute.Key, len(chunk))
		for i, p := range chunk {
			keys[i] = p.key
		}
		res, err := a.apply(ctx, keys)
		if err == nil && len(unseen) > 0 {
			res, err = a.applyAgainIfUnseen(ctx, keys, res, unseen)
			unseen = nil
		}
		if err != nil {
			return 0, 0, fmt.Errorf("apply keys: batch of %d keys of %s: %w", len(keys), a.relation, err)
		}
		if res.Handover != "" {
			// The gate found the hand-over recorded: nothing was written,
			// and the keys left are the application's rules' now.
			h, err := pglogrepl.ParseLSN(res.Handover)
			if err != nil {
				return 0, 0, fmt.Errorf("read the hand-over position %q: %w", res.Handover, err)
			}
			return corrected, held, &handedOver{lsn: h}
		}
		corrected += res.Corrected
		held += len(res.Skipped)
		if len(res.Samples) > 0 {
			a.mu.Lock()
			a.recent = append(slices.Clone(res.Samples), a.recent...)
			a.recent = a.recent[:min(len(a.recent), maxRecent)]
			a.mu.Unlock()
		}
		a.countEvidence(chunk, res)
		a.keepHeld(chunk, res.Skipped)
	}
	return corrected, held, nil
}

// applyAgainIfUnseen runs keys' statement again when any of xids was still
// running in the snapshot of the run that gave res, once they are all
// visible: that run may have missed their rows (an insert not seen at all).
// The result counts the corrections of both runs.
func (a *Applier) applyAgainIfUnseen(ctx context.Context, keys []recompute.Key, res recompute.Result, xids []uint32) (recompute.Result, error) {
	running, err := stillRunning(res.Snapshot, xids)
	if err != nil || len(running) == 0 {
		return res, err
	}
	if _, err := a.waitVisible(ctx, running); err != nil {
		return res, err
	}
	again, err := a.apply(ctx, keys)
	if err != nil {
		return res, err
	}
	again.Corrected += res.Corrected
	again.Samples = append(res.Samples, again.Samples...)
	return again, nil
}

// countEvidence credits a statement's evidence-bearing keys when it
// corrected nothing; a statement that corrected rows instead moves the time
// of the last correction. Keys come back from SQL printed by PostgreSQL,
// which need not match the stream's text, so the statement, not the key, is
// the unit: a mixed statement counts as a correction only.
func (a *Applier) countEvidence(chunk []*pending, res recompute.Result) {
	if res.Corrected > 0 {
		var latest time.Time
		for _, p := range chunk {
			latest = maxTime(latest, p.lastTime)
		}
		if !latest.IsZero() && latest.UnixNano() > a.correctedAt.Load() {
			a.correctedAt.Store(latest.UnixNano())
		}
		return
	}
	skipped := make(map[string]bool, len(res.Skipped))
	for _, k := range res.Skipped {
		skipped[k.ID()] = true
	}
	var n uint64
	for _, p := range chunk {
		if p.evidence && !skipped[p.key.ID()] {
			n++
		}
	}
	a.evidence.Add(n)
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// handedOver is what correct returns when a gated statement found the
// hand-over recorded at lsn.
type handedOver struct{ lsn pglogrepl.LSN }

func (h *handedOver) Error() string { return "handed over at " + h.lsn.String() }

// checkAfterHandover is handOver once the buffer's transactions are
// visible.
func (a *Applier) checkAfterHandover(ctx context.Context, entries []*pending, unseen []uint32, h pglogrepl.LSN) (corrected int64, held int, err error) {
	if len(unseen) > 0 {
		if _, err := a.waitVisible(ctx, unseen); err != nil {
			return 0, 0, fmt.Errorf("apply keys: %w", err)
		}
	}
	return a.handOver(ctx, entries, h)
}

// handOver runs once the application owns the new columns from position h.
// A key whose latest change came before h is still the expression's: it is
// corrected, but only where the row is still the version that change wrote
// (KeysGuarded), so a newer change by the application, not delivered yet,
// is never overwritten. Every key is then checked, read-only, and the result
// reported to Config.Checks; nothing else is written.
func (a *Applier) handOver(ctx context.Context, entries []*pending, h pglogrepl.LSN) (corrected int64, held int, err error) {
	var before []*pending
	for _, p := range entries {
		if p.lastLSN < h {
			before = append(before, p)
		}
	}
	for chunk := range slices.Chunk(before, statementKeys) {
		keys := make([]recompute.Key, len(chunk))
		xids := make([]uint32, len(chunk))
		for i, p := range chunk {
			keys[i], xids[i] = p.key, p.lastXid
		}
		if err := a.setLockTimeout(ctx, true); err != nil {
			return 0, 0, err
		}
		n, err := a.table.KeysGuarded(ctx, a.conn, keys, xids)
		if dbconn.IsLockTimeout(err) {
			// The application holds a row: check these next time.
			for _, p := range chunk {
				entries = slices.DeleteFunc(entries, func(e *pending) bool { return e == p })
			}
			held += len(chunk)
			continue
		}
		if err != nil {
			return 0, 0, fmt.Errorf("apply keys changed before the hand-over: %w", err)
		}
		corrected += n
	}
	for chunk := range slices.Chunk(entries, statementKeys) {
		keys := make([]recompute.Key, len(chunk))
		for i, p := range chunk {
			keys[i] = p.key
		}
		found, err := a.table.CheckKeys(ctx, a.conn, keys)
		if err != nil {
			return 0, 0, fmt.Errorf("check keys of %s: %w", a.relation, err)
		}
		bad := make(map[string]bool, len(found))
		for _, m := range found {
			bad[m.Key.ID()] = true
		}
		var clean []recompute.Key
		for _, k := range keys {
			if !bad[k.ID()] {
				clean = append(clean, k)
			}
		}
		if a.cfg.Checks == nil {
			return 0, 0, errors.New("applier: the application owns the new columns but Config.Checks is nil")
		}
		if err := a.cfg.Checks.Report(ctx, found, clean); err != nil {
			return 0, 0, fmt.Errorf("report checks: %w", err)
		}
		a.checked.Add(uint64(len(keys)))
		a.mismatches.Add(uint64(len(found)))
		for _, p := range chunk {
			delete(a.buf, p.key.ID())
		}
	}
	return corrected, held, nil
}

// apply recomputes keys as one plain UPDATE under a lock_timeout of
// recompute.FastLockTimeout (the session's, set once: a transaction to set
// it per statement cost three more round trips each); only when the
// application holds one of the rows longer does it run, without the
// time-out, the statement that locks rows ahead and passes over held ones.
// Locking ahead writes every row twice (the lock, then the update), which at
// a busy application's rate was half of the applier's cost.
//
// While held rows are being passed over (the last locking statement skipped
// some), the next statement locks ahead at once rather than wait out the
// time-out again.
func (a *Applier) apply(ctx context.Context, keys []recompute.Key) (recompute.Result, error) {
	if !a.contended {
		if err := a.setLockTimeout(ctx, true); err != nil {
			return recompute.Result{}, err
		}
		res, err := a.table.KeysFast(ctx, a.conn, a.cfg.Gate, keys)
		if !dbconn.IsLockTimeout(err) {
			return res, err
		}
	}
	if err := a.setLockTimeout(ctx, false); err != nil {
		return recompute.Result{}, err
	}
	a.lockedFlushes.Add(1)
	res, err := a.table.KeysGated(ctx, a.conn, a.cfg.Gate, keys)
	a.contended = err == nil && len(res.Skipped) > 0 && res.Handover == ""
	return res, err
}

// setLockTimeout sets the session's lock_timeout to recompute.FastLockTimeout
// (fast) or Config.LockTimeout, unless it is set so already.
func (a *Applier) setLockTimeout(ctx context.Context, fast bool) error {
	if a.fastTimeout == fast && a.timeoutSet {
		return nil
	}
	d := a.cfg.LockTimeout
	if fast {
		d = recompute.FastLockTimeout
	}
	if err := dbconn.SetLockTimeout(ctx, a.conn, d, false); err != nil {
		return err
	}
	a.fastTimeout, a.timeoutSet = fast, true
	return nil
}

// keepHeld removes the keys of chunk from the buffer except those skipped.
// A skipped key comes back in the text PostgreSQL prints for it, which may
// differ from the text the stream gave ("007" for an integer 7, a timestamptz
// in another time zone); one not found is buffered under that text with the
// earliest transaction among the keys removed, so confirmed never passes it.
func (a *Applier) keepHeld(chunk []*pending, skipped []recompute.Key) {
	keep := make(map[string]bool, len(skipped))
	for _, k := range skipped {
		keep[k.ID()] = true
	}
	var earliest *pending // of the keys removed, one of which a misprinted skipped key is
	for _, p := range chunk {
		c := p.key.ID()
		if keep[c] {
			delete(keep, c) // found: stays as it is
			continue
		}
		delete(a.buf, c)
		if earliest == nil || p.lsn < earliest.lsn {
			earliest = p
		}
	}
	if earliest == nil {
		earliest = slices.MinFunc(chunk, func(x, y *pending) int { return cmp.Compare(x.lsn, y.lsn) })
	}
	for _, k := range skipped {
		c := k.ID()
		if !keep[c] {
			continue
		}
		if p, ok := a.buf[c]; ok {
			if earliest.lsn < p.lsn {
				p.lsn, p.time = earliest.lsn, earliest.time
			}
		} else {
			a.buf[c] = &pending{key: k, lsn: earliest.lsn, time: earliest.time}
		}
	}
}

// Poll intervals of waitVisible: the wait is normally microseconds, but may
// last as long as a synchronous standby takes to answer.
const (
	visibilityPollMin = 2 * time.Millisecond
	visibilityPollMax = 50 * time.Millisecond
	visibilityWarnAt  = time.Second
)

// snapshotSQL takes a new snapshot (each statement outside a transaction gets
// its own under READ COMMITTED) and returns it as "xmin:xmax:xip,...". The
// xids are compared in Go: the stream gives 32-bit xids and the snapshot
// 64-bit ones with the epoch, whose low 32 bits are the xid.
const snapshotSQL = `SELECT pg_current_snapshot()::text`

// waitVisible polls new snapshots on the applier's connection, between
// statements, until none of xids is running in one. waited reports whether
// any was running at the first look; such a wait is counted in
// VisibilityWaits when it starts, so a long one shows while it lasts.
func (a *Applier) waitVisible(ctx context.Context, xids []uint32) (waited bool, err error) {
	start := time.Now()
	poll := visibilityPollMin
	warned := false
	for {
		var snap string
		if err := a.conn.QueryRow(ctx, snapshotSQL).Scan(&snap); err != nil {
			return waited, fmt.Errorf("take a snapshot to check that %d transactions are visible: %w", len(xids), err)
		}
		running, err := stillRunning(snap, xids)
		if err != nil {
			return waited, err
		}
		if len(running) == 0 {
			if warned {
				a.log.Info("transactions visible; applying", "waited", time.Since(start))
			}
			return waited, nil
		}
		if !waited {
			waited = true
			a.visWaits.Add(1)
		}
		xids = running
		if !warned && time.Since(start) >= visibilityWarnAt {
			warned = true
			a.log.Warn("waiting for transactions committed in WAL to become visible (a synchronous standby not answering?)",
				"xids", running, "waited", time.Since(start))
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return waited, ctx.Err()
		case <-t.C:
		}
		poll = min(2*poll, visibilityPollMax)
	}
}

// stillRunning returns the xids that the snapshot snap, the text form of a
// pg_snapshot ("xmin:xmax:xip,xip,..."), counts as running: those listed in
// xip, and those at or after xmax. The second part matters: a snapshot's xip
// lists only running transactions below xmax (one past the latest completed
// xid), so a transaction with a higher xid that is still running is not in
// it. The xids are 32 bits and wrap around; a transaction the stream sent is
// committed in WAL after the slot's catalog_xmin, which holds back
// datfrozenxid, so wraparound protection keeps it within 2^31 of xmax and the
// signed difference of the low 32 bits orders it correctly.
func stillRunning(snap string, xids []uint32) ([]uint32, error) {
	bad := func() error { return fmt.Errorf("parse snapshot %q: want xmin:xmax:xip,...", snap) }
	parts := strings.Split(snap, ":")
	if len(parts) != 3 {
		return nil, bad()
	}
	xmax, err := strconv.ParseUint(parts[1], 10, 64)
	if err != nil {
		return nil, bad()
	}
	xip := map[uint32]bool{}
	if parts[2] != "" {
		for _, f := range strings.Split(parts[2], ",") {
			x, err := strconv.ParseUint(f, 10, 64)
			if err != nil {
				return nil, bad()
			}
			xip[uint32(x)] = true
		}
	}
	var running []uint32
	for _, x := range xids {
		if xip[x] || int32(x-uint32(xmax)) >= 0 {
			running = append(running, x)
		}
	}
	return running, nil
}
