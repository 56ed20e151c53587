package phases

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/applier"
	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// ErrAborted is returned by Run when an operator aborted the migration.
var ErrAborted = errors.New("migration aborted")

// Daemon is the conductor: it runs the phases from the persisted state,
// calling the workers (snapshot, cdc, applier); they never call it.
type Daemon struct {
	cfg   *config.Config
	log   *slog.Logger
	store Store
	table *recompute.Table
	conn  *pgx.Conn // the conductor's own connection: state, DDL

	// Control flags, refreshed from the state row by the watcher.
	paused   atomic.Bool
	abort    atomic.Bool
	approved atomic.Value // string: the phase an operator approved

	pool       *pgxpool.Pool // reads from several goroutines (throttle)
	originOnce sync.Once

	pipe atomic.Pointer[pipeline] // read by the watcher too
	obs  *observer

	live live // figures for status, published by the watcher
}

// live holds what the watcher publishes: progress rate and the counters not
// yet added to the state row.
type live struct {
	mu             sync.Mutex
	throttleReason func() string
	lastRows       int64
	lastAt         time.Time
	rate           float64 // rows/s, smoothed
	savedEvents    uint64  // stream events already added to the state row
	savedFixes     uint64  // corrections already added to the state row
	ap             *applier.Applier
	apEvents       uint64 // the current applier's events already counted
	apFixes        uint64 // the current applier's corrections already counted
}

// Run is `cdcbackfill run`: it returns nil when the migration is done (or
// ctx ends: state is saved, run again to resume), or the fatal error. Once
// the daemon has led, losing the database (a server restart, a terminated
// session) is not fatal: it starts over from the state row, as a restarted
// process would.
func Run(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	obs, stopServing, err := serve(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer stopServing()
	const firstBackoff = 500 * time.Millisecond
	backoff := firstBackoff
	led := false // ever led: from then on a lost database is waited out
	for {
		ledThisTime := false
		err := runOnce(ctx, cfg, log, &ledThisTime, obs)
		led = led || ledThisTime
		if err == nil || ctx.Err() != nil || !led || !isConnLoss(err) {
			return err
		}
		if ledThisTime {
			backoff = firstBackoff // it ran again: a new outage starts the backoff over
		}
		log.Warn("lost the database; starting over from the state row", "migration", cfg.Name, "err", err, "retry_in", backoff)
		if sleep(ctx, backoff) != nil {
			return nil
		}
		backoff = min(backoff*2, 10*time.Second)
	}
}

func runOnce(ctx context.Context, cfg *config.Config, log *slog.Logger, led *bool, obs *observer) error {
	d := &Daemon{cfg: cfg, log: log.With("migration", cfg.Name), store: Store{Name: cfg.Name}, obs: obs}
	defer obs.leader.Store(false)
	d.approved.Store("")

	conn, err := Connect(ctx, cfg.Database.DSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	d.conn = conn
	pool, err := pgxpool.New(ctx, cfg.Database.DSN)
	if err != nil {
		return fmt.Errorf("connect to %s: %s", config.RedactDSN(cfg.Database.DSN), err)
	}
	defer pool.Close()
	d.pool = pool

	// Look before touching: a migration that has not started is checked
	// as plan checks it, and nothing is created when a check fails.
	st, err := d.store.Load(ctx, conn)
	if err != nil && !errors.Is(err, ErrNoMigration) {
		return err
	}
	if st == nil || st.Phase == Expand {
		report, err := Inspect(ctx, cfg)
		if err != nil {
			return err
		}
		if err := report.Err(); err != nil {
			return err
		}
	}
	if err := EnsureSchema(ctx, conn); err != nil {
		return err
	}

	lock, err := d.lead(ctx)
	if err != nil || lock == nil {
		return err
	}
	defer lock.Close(context.Background())
	*led = true
	obs.leader.Store(true)
	obs.progressed()

	if err := d.store.Create(ctx, conn); err != nil {
		return err
	}
	if err := d.loadTable(ctx); err != nil {
		return err
	}

	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		d.watch(wctx, cancel, lock)
	}()
	err = d.phases(wctx)
	if cause := context.Cause(wctx); errors.Is(cause, ErrAborted) {
		err = d.performAbort(context.WithoutCancel(ctx))
	} else if err == nil && cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause // the watcher failed (lost leadership, no connection)
	}
	cancel(nil)
	<-watchDone
	if p := d.pipe.Swap(nil); p != nil {
		p.stop()
	}
	if err != nil && ctx.Err() == nil {
		_ = d.store.Update(context.Background(), conn, "error = $2", err.Error())
		return err
	}
	d.publishStats(context.Background())
	return nil
}

var errLostLeadership = errors.New("lost the leader lock (its connection ended); stopping so two daemons never run one migration")

func (d *Daemon) loadTable(ctx context.Context) error {
	schema, name := d.cfg.TableIdent()
	cols := make([]recompute.Column, len(d.cfg.Columns))
	for i, c := range d.cfg.Columns {
		cols[i] = recompute.Column{Name: c.Name, Expr: c.Expr}
	}
	t, err := recompute.Inspect(ctx, d.conn, schema, name, cols)
	if err != nil {
		return err
	}
	d.table = t
	return nil
}

// lead takes the migration's session advisory lock on a connection of its
// own; while another daemon holds it, this one waits as a standby.
func (d *Daemon) lead(ctx context.Context) (*pgx.Conn, error) {
	conn, err := Connect(ctx, d.cfg.Database.DSN)
	if err != nil {
		return nil, err
	}
	said := false
	for {
		var got bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended('cdcbackfill:' || $1, 0))`, d.cfg.Name).Scan(&got); err != nil {
			conn.Close(context.Background())
			if ctx.Err() != nil {
				return nil, nil
			}
			return nil, fmt.Errorf("take leader lock: %w", err)
		}
		if got {
			d.obs.standby.Store(false)
			if said {
				d.log.Info("standby: the leader is gone; taking over")
			}
			return conn, nil
		}
		d.obs.standby.Store(true)
		if !said {
			d.log.Info("standby: another daemon runs this migration; waiting to take over")
			said = true
		}
		if err := sleep(ctx, time.Second); err != nil {
			conn.Close(context.Background())
			return nil, nil
		}
	}
}

// phases runs the state machine until done, ctx ends or an error.
func (d *Daemon) phases(ctx context.Context) error {
	for ctx.Err() == nil {
		st, err := d.store.Load(ctx, d.conn)
		if err != nil {
			return err
		}
		d.setControl(st)
		switch st.Phase {
		case Expand:
			err = d.expand(ctx, st)
		case Backfill:
			err = d.backfill(ctx, st)
		case Sync:
			err = d.sync(ctx, st)
		case Verify:
			err = d.verify(ctx, st)
		case Contract:
			err = d.contract(ctx, st)
		case Done, Aborted:
			d.log.Info("migration is " + st.Phase)
			return nil
		default:
			return fmt.Errorf("state row of %q has unknown phase %q", d.cfg.Name, st.Phase)
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
	return nil
}

func (d *Daemon) setControl(st *State) {
	// Operator actions are logged once, when the daemon first sees them.
	if was := d.paused.Swap(st.Paused); was != st.Paused {
		if st.Paused {
			d.log.Info("paused by operator: batches stop; the stream keeps the table in sync", "phase", st.Phase, "rows_done", st.RowsDone)
		} else {
			d.log.Info("resumed by operator", "phase", st.Phase, "rows_done", st.RowsDone)
		}
	}
	if !d.abort.Swap(st.AbortRequested) && st.AbortRequested {
		d.log.Info("abort requested by operator", "phase", st.Phase, "rollback", st.RollbackRequested)
	}
	approved := ""
	if st.ApprovedPhase != nil {
		approved = *st.ApprovedPhase
	}
	if was := d.approved.Swap(approved); was != approved && approved != "" {
		d.log.Info("approved by operator", "phase", approved)
	}
}

// watch polls the state row for operator actions, publishes live figures,
// and checks that the leader lock's connection lives.
func (d *Daemon) watch(ctx context.Context, stop context.CancelCauseFunc, lock *pgx.Conn) {
	conn, err := Connect(ctx, d.cfg.Database.DSN)
	if err != nil {
		stop(err)
		return
	}
	defer conn.Close(context.Background())
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if err := lock.Ping(ctx); err != nil && ctx.Err() == nil {
			stop(errLostLeadership)
			return
		}
		st, err := d.store.Load(ctx, conn)
		if err != nil {
			if ctx.Err() == nil {
				d.log.Warn("read state", "err", err)
			}
			continue
		}
		d.setControl(st)
		d.obs.progressed()
		if st.AbortRequested && st.Phase != Contract && st.Phase != Done && st.Phase != Aborted {
			stop(ErrAborted)
			return
		}
		d.publishStatsOn(ctx, conn, st)
	}
}
