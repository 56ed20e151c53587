package phases

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/applier"
	"github.com/cdcbackfill/cdcbackfill/cdc"
	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// pipeline is the stream feeding the applier, from the moment the slot
// exists until contract. It restarts itself after a connection loss (the
// server replays from the confirmed position) and stops for good on a
// permanent error.
type pipeline struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	err     error // permanent failure
	failed  chan struct{}
	stream  *cdc.Stream
	applier *applier.Applier
}

// replication is the daemon's side of the stream: the pipeline in hand and
// what each applier and stream it starts is given.
type replication struct {
	pipe atomic.Pointer[pipeline] // read by the watcher too
	// handover is the WAL position from which the application owns the
	// new columns; 0 while the expressions own them. The pipeline gives it
	// to each applier it starts.
	handover atomic.Uint64
	// sources are the table's columns the expressions read (for the
	// evidence of dual-write); nil when they could not be found.
	sources    []string
	originOnce sync.Once    // the warning that the role may not set an origin
	originMode atomic.Value // string: where the daemon's own writes leave the stream, as last logged
}

// stopPipeline stops the pipeline in hand, if any, and waits for it.
func (r *replication) stopPipeline() {
	if p := r.pipe.Swap(nil); p != nil {
		p.stop()
	}
}

// setHandover makes the application the owner of the new columns from lsn
// (0: the expressions again), in the running applier and any later one.
func (r *replication) setHandover(lsn pglogrepl.LSN) {
	r.handover.Store(uint64(lsn))
	if p := r.pipe.Load(); p != nil {
		if _, ap := p.current(); ap != nil {
			ap.SetHandover(lsn)
		}
	}
}

// maxStreamGather caps cdc.Config.MaxGather.
const maxStreamGather = 100 * time.Millisecond

// startPipeline starts the stream and the applier unless they run.
func (d *Daemon) startPipeline(ctx context.Context) error {
	if d.repl.pipe.Load() != nil {
		return d.repl.pipe.Load().failure()
	}
	pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p := &pipeline{cancel: cancel, done: make(chan struct{}), failed: make(chan struct{})}
	d.repl.pipe.Store(p)
	go func() {
		defer close(p.done)
		d.supervise(pctx, p)
	}()
	return nil
}

// supervise runs the stream and applier, restarting both after a
// transient failure.
func (d *Daemon) supervise(ctx context.Context, p *pipeline) {
	backoff := dbconn.NewBackoff(200*time.Millisecond, 5*time.Second)
	for ctx.Err() == nil {
		err := d.runPipelineOnce(ctx, p)
		if ctx.Err() != nil {
			return
		}
		if permanentPipelineError(err) {
			if errors.Is(err, cdc.ErrSlotLost) {
				err = fmt.Errorf("%w; to recover, stop the daemon and run `cdcbackfill recover --config FILE`: it drops the lost slot, and `run` then backfills again with a new slot from the table's first key (every row is recomputed from the table as it is: nothing the application wrote is lost)", err)
			}
			p.mu.Lock()
			p.err = err
			p.mu.Unlock()
			close(p.failed)
			d.log.Error("sync stream stopped", "err", err)
			return
		}
		wait := backoff.Next()
		d.rlog.Warn("sync stream interrupted; restarting from the slot's confirmed position", "err", err, "retry_in", wait.Round(time.Millisecond))
		if dbconn.Sleep(ctx, wait) != nil {
			return
		}
	}
}

func permanentPipelineError(err error) bool {
	if errors.Is(err, cdc.ErrSlotLost) || errors.Is(err, cdc.ErrSlotMissing) ||
		errors.Is(err, cdc.ErrPublicationMissing) || errors.Is(err, cdc.ErrNotAllowed) ||
		errors.Is(err, applier.ErrForeignRelation) {
		return true
	}
	// An expression that fails on a row, a constraint it breaks, a
	// statement the server refuses: the same WAL fails the same way again.
	s := dbconn.SQLState(err)
	return pgerrcode.IsDataException(s) || pgerrcode.IsIntegrityConstraintViolation(s) || pgerrcode.IsSyntaxErrororAccessRuleViolation(s)
}

// runPipelineOnce runs one stream and one applier on a fresh writer
// connection until either ends.
func (d *Daemon) runPipelineOnce(ctx context.Context, p *pipeline) error {
	w, err := d.writerConn(ctx, "a", 0)
	if err != nil {
		return err
	}
	defer w.Close(context.Background())
	info, err := checkSlot(ctx, w, d.cfg.SlotName())
	if err != nil {
		return err
	}
	ap := d.newApplier(w, info.ConfirmedLSN)
	if err := checkPublication(ctx, w, d.cfg.PublicationName()); err != nil {
		return err
	}
	st, err := d.newStream(ctx, w)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.stream, p.applier = st, ap
	p.mu.Unlock()
	// A handover recorded while this applier was being made reaches it too.
	ap.SetHandover(pglogrepl.LSN(d.repl.handover.Load()))
	return runPair(ctx, st, ap)
}

// checkSlot finds the slot the stream reads, refusing one that is gone or
// that the server invalidated.
func checkSlot(ctx context.Context, w *pgx.Conn, slot string) (snapshot.SlotInfo, error) {
	info, err := snapshot.LookupSlot(ctx, w, slot)
	if err != nil {
		return info, err
	}
	if !info.Exists {
		return info, fmt.Errorf("%w: slot %q is gone", cdc.ErrSlotMissing, slot)
	}
	if info.Lost() {
		why := "wal_status lost"
		if info.Invalidated != "" {
			why = "invalidated: " + info.Invalidated
			if info.Invalidated == "idle_timeout" {
				why += ", unused longer than idle_replication_slot_timeout while no daemon ran"
			}
		}
		return info, fmt.Errorf("%w: slot %q (%s)", cdc.ErrSlotLost, slot, why)
	}
	return info, nil
}

// newApplier makes the applier that writes (or checks) on w from the
// slot's confirmed position.
func (d *Daemon) newApplier(w *pgx.Conn, confirmed pglogrepl.LSN) *applier.Applier {
	acfg := applier.Config{
		FlushInterval: d.cfg.Sync.FlushInterval,
		MaxBatchKeys:  d.cfg.Sync.MaxBatchKeys,
		LockTimeout:   d.cfg.DDL.LockTimeout,
		Checks:        d.parity,
		Gate:          d.store.HandoverGate(),
		Logger:        d.log,
	}
	if d.cfg.Sync.Correction == config.CorrectionDeferred {
		acfg.Defer, acfg.MaxDeferredKeys, acfg.Pace = d.cfg.Sync.DeferFor, d.cfg.Sync.MaxDeferredKeys, deferredPace(d.cfg.Backfill)
	}
	ap := applier.New(w, d.table, acfg)
	ap.SetConfirmed(confirmed)
	ap.SetHandover(pglogrepl.LSN(d.repl.handover.Load()))
	return ap
}

// checkPublication refuses a publication dropped under the migration.
// PostgreSQL 18 streams nothing, silently, for a publication that is gone;
// older servers fail. Either way the changes since are lost.
func checkPublication(ctx context.Context, w *pgx.Conn, publication string) error {
	var published bool
	if err := w.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, publication).Scan(&published); err != nil {
		return fmt.Errorf("look up publication %q: %w", publication, err)
	}
	if !published {
		return fmt.Errorf("%w: publication %q was dropped under the migration: changes since are lost to it; abort the migration (cdcbackfill abort) and run it again", cdc.ErrPublicationMissing, publication)
	}
	return nil
}

// newStream makes the stream of the slot, with the walsender dropping the
// daemon's own transactions where it safely can (pgfeature.OriginNone).
func (d *Daemon) newStream(ctx context.Context, w *pgx.Conn) (*cdc.Stream, error) {
	serverSide, why, err := pgfeature.OriginNone(ctx, w, d.cfg.Sync.OriginFilter, d.table.Ident())
	if err != nil {
		return nil, err
	}
	if d.repl.originMode.Swap(why) != why {
		d.log.Info("stream: "+why, "origin_filter", d.cfg.Sync.OriginFilter)
	}
	newCols := make([]string, len(d.table.Columns))
	for i, c := range d.table.Columns {
		newCols[i] = c.Name
	}
	return cdc.New(cdc.Config{
		DSN:           d.cfg.Database.DSN,
		Slot:          d.cfg.SlotName(),
		Publication:   d.cfg.PublicationName(),
		OriginPrefix:  d.cfg.OriginPrefix(),
		OriginNone:    serverSide,
		KeyColumns:    d.table.KeyNames(),
		SourceColumns: d.repl.sources,
		NewColumns:    newCols,
		// A change waits for the applier's flush anyway: gathering that
		// long adds at most one interval of apply lag and wakes the daemon
		// once per interval, not per message. Waits that need the stream
		// now (catch-up, cut-over) poke it.
		MaxGather: min(d.cfg.Sync.FlushInterval, maxStreamGather),
		Logger:    d.log,
	}), nil
}

// runPair runs the stream into the applier until either ends. Shutdown
// order (see cdc and applier docs): the applier stops first and flushes
// what it holds; only then does the stream stop, so its final standby
// status carries the applier's final position.
func runPair(ctx context.Context, st *cdc.Stream, ap *applier.Applier) error {
	base := context.WithoutCancel(ctx)
	actx, acancel := context.WithCancel(base)
	sctx, scancel := context.WithCancel(base)
	defer acancel()
	defer scancel()
	go func() {
		select {
		case <-ctx.Done():
		case <-sctx.Done():
		}
		acancel()
	}()
	events := make(chan cdc.Event, 1024)
	streamErr := make(chan error, 1)
	go func() {
		err := st.Run(sctx, events, ap.ConfirmedLSN)
		streamErr <- err
		acancel() // the stream failed for good: nothing more to apply
	}()
	applyErr := ap.Run(actx, events)
	scancel()
	serr := <-streamErr
	if applyErr != nil {
		return applyErr
	}
	return serr
}

// failure is the pipeline's permanent error, or nil.
func (p *pipeline) failure() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// current returns the running stream and applier (nil before the first
// start).
func (p *pipeline) current() (*cdc.Stream, *applier.Applier) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stream, p.applier
}

// guard runs fn with a context that ends when the pipeline fails for
// good, and returns that failure.
func (p *pipeline) guard(ctx context.Context, fn func(context.Context) error) error {
	gctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-p.failed:
			cancel()
		case <-gctx.Done():
		}
	}()
	err := fn(gctx)
	if perr := p.failure(); perr != nil {
		return fmt.Errorf("sync stream: %w", perr)
	}
	return err
}

// waitApplied blocks until the applier has confirmed lsn (applied, or
// checked, every change committed before it), asking the stream for the
// server's position now and then so WAL that brings no change (other
// tables, the daemon's own writes) is passed at once.
func (p *pipeline) waitApplied(ctx context.Context, lsn pglogrepl.LSN) error {
	var poke time.Time // the first check pokes: the stream may be gathering
	for {
		if err := p.failure(); err != nil {
			return err
		}
		st, ap := p.current()
		if ap != nil && ap.ConfirmedLSN() >= lsn {
			return nil
		}
		if st != nil && time.Since(poke) >= 100*time.Millisecond {
			st.Poke()
			if ap != nil {
				ap.Hurry() // keys deferred or waiting their interval
			}
			poke = time.Now()
		}
		if err := dbconn.Sleep(ctx, 10*time.Millisecond); err != nil {
			return err
		}
	}
}

// deferredPace paces the statements of a deferred correction as backfill
// batches are: the throttle's row rate (backfill.max_rows_per_second), then
// backfill.sleep. Not the lag bounds or the pause: the deferral itself holds
// the slot back, and corrections must go on for waits on the stream to end.
func deferredPace(cfg config.Backfill) func(ctx context.Context, keys int) error {
	th := snapshot.NewThrottle(snapshot.ThrottleConfig{MaxRowsPerSecond: cfg.MaxRowsPerSecond}, nil, nil)
	return func(ctx context.Context, keys int) error {
		if err := th.Wait(ctx, keys); err != nil {
			return err
		}
		return dbconn.Sleep(ctx, cfg.Sleep)
	}
}

// caughtUp reports whether the stream has applied (or checked) everything
// committed before now, waiting at most wait.
func (p *pipeline) caughtUp(ctx context.Context, q dbconn.Querier, wait time.Duration) (bool, error) {
	lsn, err := insertLSN(ctx, q)
	if err != nil {
		return false, err
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err = p.waitApplied(wctx, lsn)
	if err != nil && wctx.Err() != nil && ctx.Err() == nil {
		return false, nil
	}
	return err == nil, err
}

func (p *pipeline) stop() {
	p.cancel()
	<-p.done
}
