package phases

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
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

// maxStreamGather caps cdc.Config.MaxGather.
const maxStreamGather = 100 * time.Millisecond

// startPipeline starts the stream and the applier unless they run.
func (d *Daemon) startPipeline(ctx context.Context) error {
	if d.pipe.Load() != nil {
		return d.pipe.Load().failure()
	}
	pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p := &pipeline{cancel: cancel, done: make(chan struct{}), failed: make(chan struct{})}
	d.pipe.Store(p)
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

func (d *Daemon) runPipelineOnce(ctx context.Context, p *pipeline) error {
	w, err := d.writerConn(ctx, "a", 0)
	if err != nil {
		return err
	}
	defer w.Close(context.Background())
	info, err := snapshot.LookupSlot(ctx, w, d.cfg.SlotName())
	if err != nil {
		return err
	}
	if !info.Exists {
		return fmt.Errorf("%w: slot %q is gone", cdc.ErrSlotMissing, d.cfg.SlotName())
	}
	if info.Lost() {
		why := "wal_status lost"
		if info.Invalidated != "" {
			why = "invalidated: " + info.Invalidated
			if info.Invalidated == "idle_timeout" {
				why += ", unused longer than idle_replication_slot_timeout while no daemon ran"
			}
		}
		return fmt.Errorf("%w: slot %q (%s)", cdc.ErrSlotLost, d.cfg.SlotName(), why)
	}
	acfg := applier.Config{
		FlushInterval: d.cfg.Sync.FlushInterval,
		MaxBatchKeys:  d.cfg.Sync.MaxBatchKeys,
		LockTimeout:   d.cfg.DDL.LockTimeout,
		Checks:        &d.checks,
		Gate:          d.store.HandoverGate(),
		Logger:        d.log,
	}
	if d.cfg.Sync.Correction == config.CorrectionDeferred {
		acfg.Defer, acfg.MaxDeferredKeys, acfg.Pace = d.cfg.Sync.DeferFor, d.cfg.Sync.MaxDeferredKeys, d.deferredPace()
	}
	ap := applier.New(w, d.table, acfg)
	ap.SetConfirmed(info.ConfirmedLSN)
	ap.SetHandover(pglogrepl.LSN(d.handover.Load()))
	// PostgreSQL 18 streams nothing, silently, for a publication that is
	// gone; older servers fail. Either way the changes since are lost.
	var published bool
	if err := w.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, d.cfg.PublicationName()).Scan(&published); err != nil {
		return fmt.Errorf("look up publication %q: %w", d.cfg.PublicationName(), err)
	}
	if !published {
		return fmt.Errorf("%w: publication %q was dropped under the migration: changes since are lost to it; abort the migration (cdcbackfill abort) and run it again", cdc.ErrPublicationMissing, d.cfg.PublicationName())
	}
	serverSide, why, err := pgfeature.OriginNone(ctx, w, d.cfg.Sync.OriginFilter, d.table.Ident())
	if err != nil {
		return err
	}
	if d.originMode.Swap(why) != why {
		d.log.Info("stream: "+why, "origin_filter", d.cfg.Sync.OriginFilter)
	}
	newCols := make([]string, len(d.table.Columns))
	for i, c := range d.table.Columns {
		newCols[i] = c.Name
	}
	st := cdc.New(cdc.Config{
		DSN:           d.cfg.Database.DSN,
		Slot:          d.cfg.SlotName(),
		Publication:   d.cfg.PublicationName(),
		OriginPrefix:  d.cfg.OriginPrefix(),
		OriginNone:    serverSide,
		KeyColumns:    d.table.KeyNames(),
		SourceColumns: d.sources,
		NewColumns:    newCols,
		// A change waits for the applier's flush anyway: gathering that
		// long adds at most one interval of apply lag and wakes the daemon
		// once per interval, not per message. Waits that need the stream
		// now (catch-up, cut-over) poke it.
		MaxGather: min(d.cfg.Sync.FlushInterval, maxStreamGather),
		Logger:    d.log,
	})
	p.mu.Lock()
	p.stream, p.applier = st, ap
	p.mu.Unlock()
	// A handover recorded while this applier was being made reaches it too.
	ap.SetHandover(pglogrepl.LSN(d.handover.Load()))

	// Shutdown order (see cdc and applier docs): the applier stops first and
	// flushes what it holds; only then does the stream stop, so its final
	// standby status carries the applier's final position.
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
func (d *Daemon) deferredPace() func(ctx context.Context, keys int) error {
	th := snapshot.NewThrottle(snapshot.ThrottleConfig{MaxRowsPerSecond: d.cfg.Backfill.MaxRowsPerSecond}, nil, nil)
	return func(ctx context.Context, keys int) error {
		if err := th.Wait(ctx, keys); err != nil {
			return err
		}
		return dbconn.Sleep(ctx, d.cfg.Backfill.Sleep)
	}
}

// caughtUp reports whether the stream has applied (or checked) everything
// committed before now, waiting at most wait.
func (d *Daemon) caughtUp(ctx context.Context, wait time.Duration) (bool, error) {
	lsn, err := insertLSN(ctx, d.conn)
	if err != nil {
		return false, err
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err = d.pipe.Load().waitApplied(wctx, lsn)
	if err != nil && wctx.Err() != nil && ctx.Err() == nil {
		return false, nil
	}
	return err == nil, err
}

func (p *pipeline) stop() {
	p.cancel()
	<-p.done
}

// writer is a connection for the daemon's own writes, tagged with a
// replication origin when the role may set one.
func (d *Daemon) writerConn(ctx context.Context, kind string, i int) (*pgx.Conn, error) {
	conn, err := dbconn.Connect(ctx, d.cfg.Database.DSN)
	if err != nil {
		return nil, err
	}
	name := d.cfg.OriginPrefix() + kind + strconv.Itoa(i)
	_, err = conn.Exec(ctx, `SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)`, name)
	if err == nil {
		// A session of a daemon that just died still holds it.
		err = execWhileInUse(ctx, conn, 200*time.Millisecond, `SELECT pg_replication_origin_session_setup($1)`, name)
	}
	if err != nil {
		if dbconn.SQLState(err) != pgerrcode.InsufficientPrivilege {
			conn.Close(context.Background())
			return nil, fmt.Errorf("set replication origin %q: %w", name, err)
		}
		d.originOnce.Do(func() {
			d.log.Warn("the role may not set a replication origin: the daemon's own writes come back through the stream, where re-applying them changes no row and writes no WAL; to skip them, GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text), pg_replication_origin_create(text) TO <role>",
				"err", err)
		})
	}
	return conn, nil
}

// writerConns opens n writer connections of one kind.
func (d *Daemon) writerConns(ctx context.Context, n int, kind string) ([]*pgx.Conn, error) {
	conns := make([]*pgx.Conn, 0, n)
	for i := 0; i < n; i++ {
		c, err := d.writerConn(ctx, kind, i)
		if err != nil {
			closeAll(conns)
			return nil, err
		}
		conns = append(conns, c)
	}
	return conns, nil
}

func closeAll(conns []*pgx.Conn) {
	for _, c := range conns {
		c.Close(context.Background())
	}
}

// dropOrigins removes the daemon's replication origins.
func dropOrigins(ctx context.Context, conn *pgx.Conn, prefix string) error {
	// A writer's session just closed still holds its origin for a moment on
	// the server.
	err := execWhileInUse(ctx, conn, 100*time.Millisecond,
		`SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE starts_with(roname, $1)`, prefix)
	if err == nil || dbconn.SQLState(err) == pgerrcode.InsufficientPrivilege {
		return nil
	}
	return fmt.Errorf("drop replication origins %s*: %w", prefix, err)
}

// execWhileInUse runs sql, again every pause while it fails with 55006
// (object in use: a replication origin another session still holds), at
// most 50 times more. It returns the last error, or ctx's.
func execWhileInUse(ctx context.Context, conn *pgx.Conn, pause time.Duration, sql string, args ...any) error {
	for try := 0; ; try++ {
		_, err := conn.Exec(ctx, sql, args...)
		if dbconn.SQLState(err) != pgerrcode.ObjectInUse || try == 50 {
			return err
		}
		if err := dbconn.Sleep(ctx, pause); err != nil {
			return err
		}
	}
}
