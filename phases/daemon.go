package phases

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
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/applier"
	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/internal/repeatlog"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// ErrAborted is returned by Run when an operator aborted the migration.
var ErrAborted = errors.New("migration aborted")

// Daemon is the conductor: it runs the phases from the persisted state,
// calling the workers (snapshot, cdc, applier); they never call it.
type Daemon struct {
	cfg   *config.Config
	log   *slog.Logger
	rlog  *repeatlog.Log // for lines a loop may repeat
	store state.Store
	table *recompute.Table
	conn  *pgx.Conn     // the conductor's own connection: state, DDL
	pool  *pgxpool.Pool // reads from several goroutines (throttle, checks)

	// Control flags, refreshed from the state row by the watcher.
	paused   atomic.Bool
	abort    atomic.Bool
	approved atomic.Value // state.Phase: the phase an operator approved

	// handover is the WAL position from which the application owns the
	// new columns; 0 while the expressions own them. The pipeline gives it
	// to each applier it starts.
	handover atomic.Uint64
	// approvedHandover is the hand-over approve recorded in sync, as the
	// state row last said (0: none).
	approvedHandover atomic.Uint64
	// finish is what the new columns become (indexes, NOT NULL,
	// constraints) and the expand and contract lists as they run.
	finish *ddl.Finish
	// overran is the contract statement that ran past max_hold in the
	// last cut-over; the next waits for the operator's approve.
	overran atomic.Pointer[overrunError]
	// sources are the table's columns the expressions read (for the
	// evidence of dual-write); nil when they could not be found.
	sources []string

	originOnce sync.Once
	originMode atomic.Value             // string: where the daemon's own writes leave the stream, as last logged
	pipe       atomic.Pointer[pipeline] // read by the watcher too
	obs        *observer
	checks     checkSink

	waiting   atomic.Value // string: what the phase in hand waits for, for status
	dualWrite atomic.Pointer[state.DualWrite]

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
	savedEvidence  uint64  // evidence of appliers that have ended
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
	backoff := dbconn.NewBackoff(500*time.Millisecond, 10*time.Second)
	led := false // ever led: from then on a lost database is waited out
	// An outage retried every 10s says so once, then a summary per interval.
	outage := repeatlog.New(log, 0)
	defer outage.End()
	for {
		ledThisTime := false
		err := runOnce(ctx, cfg, log, &ledThisTime, obs)
		led = led || ledThisTime
		if err == nil || ctx.Err() != nil || !led || !isConnLoss(err) {
			return err
		}
		if ledThisTime {
			backoff.Reset() // it ran again: a new outage starts the backoff over
			outage.End()
		}
		wait := backoff.Next()
		outage.Warn("lost the database; starting over from the state row", "migration", cfg.Name, "err", err, "retry_in", wait.Round(time.Millisecond))
		if dbconn.Sleep(ctx, wait) != nil {
			return nil
		}
	}
}

func runOnce(ctx context.Context, cfg *config.Config, log *slog.Logger, led *bool, obs *observer) error {
	log = log.With("migration", cfg.Name)
	d := &Daemon{cfg: cfg, log: log, rlog: repeatlog.New(log, 0), store: state.Store{Name: cfg.Name}, obs: obs}
	d.checks.d = d
	defer obs.leader.Store(false)
	defer d.rlog.End() // what it counted is over with this daemon's run
	d.approved.Store(state.Phase(""))
	d.waiting.Store("")
	d.originMode.Store("")

	conn, err := dbconn.Connect(ctx, cfg.Database.DSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	d.conn = conn

	// Look before touching: a migration that has not started is checked
	// as plan checks it, and nothing is created when a check fails.
	st, err := d.store.Load(ctx, conn)
	if err != nil && !errors.Is(err, state.ErrNoMigration) {
		return err
	}
	if st == nil || st.Phase == state.Expand {
		report, err := Inspect(ctx, cfg)
		if err != nil {
			return err
		}
		if err := report.Err(); err != nil {
			return err
		}
		for _, a := range report.Allowed {
			log.Warn("ddl: a statement the rules refuse will run, allowed explicitly", "statement", a)
		}
	}
	if err := state.EnsureSchema(ctx, conn, cfg.DDL.LockTimeout); err != nil {
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

	pcfg, err := pgxpool.ParseConfig(cfg.Database.DSN)
	if err != nil {
		return fmt.Errorf("database.dsn %s does not parse", dbconn.RedactDSN(cfg.Database.DSN))
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = dbconn.ApplicationName
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", dbconn.RedactDSN(cfg.Database.DSN), dbconn.Redact(err, pcfg.ConnConfig.Password))
	}
	defer pool.Close()
	d.pool = pool

	if err := d.store.Create(ctx, conn); err != nil {
		return err
	}
	// A daemon leads now: the last one's fatal error is history (the event
	// log keeps what happened), and status must not show it as current.
	if err := d.store.SetError(ctx, conn, nil); err != nil {
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
	if cause := context.Cause(wctx); errors.Is(cause, ErrAborted) || errors.Is(err, ErrAborted) {
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
		msg := err.Error()
		_ = d.store.SetError(context.Background(), conn, &msg)
		return err
	}
	d.publishStats(context.Background())
	return nil
}

var errLostLeadership = errors.New("lost the leader lock (its connection ended); stopping so two daemons never run one migration")

func isConnLoss(err error) bool {
	return errors.Is(err, errLostLeadership) || dbconn.IsConnLoss(err)
}

func (d *Daemon) loadTable(ctx context.Context) error {
	t, err := recompute.InspectMigration(ctx, d.conn, d.cfg)
	if err != nil {
		return err
	}
	if d.finish == nil {
		v, err := pgfeature.ServerVersion(ctx, d.conn)
		if err != nil {
			return err
		}
		if d.finish, err = ddl.PlanFor(d.cfg, v); err != nil {
			return err
		}
	}
	t.RequireNotNull(d.finish.NotNull)
	d.table = t
	if len(t.MissingColumns()) == 0 {
		d.findSources(ctx)
	}
	return nil
}

// findSources learns which columns the expressions read, once the new
// columns exist; without them only inserts count as evidence of dual-write.
func (d *Daemon) findSources(ctx context.Context) {
	src, err := d.table.SourceColumns(ctx, d.conn)
	if err != nil {
		d.log.Warn("could not find the columns the expressions read; only inserts count as evidence of dual-write", "err", err)
		return
	}
	d.sources = src
}

// lead takes the migration's session advisory lock on a connection of its
// own; while another daemon holds it, this one waits as a standby.
func (d *Daemon) lead(ctx context.Context) (*pgx.Conn, error) {
	conn, err := dbconn.Connect(ctx, d.cfg.Database.DSN)
	if err != nil {
		return nil, err
	}
	said := false
	for {
		got, err := dbconn.TryLeaderLock(ctx, conn, d.cfg.Name)
		if err != nil {
			conn.Close(context.Background())
			if ctx.Err() != nil {
				return nil, nil
			}
			return nil, err
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
		if err := dbconn.Sleep(ctx, time.Second); err != nil {
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
		switch {
		case st.HandoverLSN != nil:
			d.handover.Store(uint64(*st.HandoverLSN))
		case st.Phase == state.Verify || st.Phase == state.Contract && st.ContractDone == 0:
			// Reached verify under a daemon that did not record the
			// hand-over: the application owns the new columns from now.
			lsn, err := insertLSN(ctx, d.conn)
			if err != nil {
				return err
			}
			if err := d.store.SetHandover(ctx, d.conn, lsn); err != nil {
				return err
			}
			d.setHandover(lsn)
		default:
			d.setHandover(0)
		}
		d.waiting.Store("")
		switch st.Phase {
		case state.Expand:
			err = d.expand(ctx, st)
		case state.Backfill:
			err = d.backfill(ctx, st)
		case state.Sync:
			err = d.sync(ctx, st)
		case state.Verify:
			err = d.verify(ctx, st)
		case state.Contract:
			err = d.contract(ctx, st)
		case state.Done, state.Aborted:
			d.log.Info("migration is " + string(st.Phase))
			return nil
		default:
			return fmt.Errorf("state row of %q has unknown phase %q", d.cfg.Name, st.Phase)
		}
		// The phase moved on (or failed): what its loops repeated is over.
		d.rlog.End()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
	return nil
}

func (d *Daemon) setControl(st *state.Migration) {
	// Operator actions are logged once, when the daemon first sees them.
	if was := d.paused.Swap(st.Paused); was != st.Paused {
		if st.Paused {
			d.log.Info("paused by operator: batches and phase changes stop; the stream keeps checking the table", "phase", st.Phase, "rows_done", st.RowsDone)
		} else {
			d.log.Info("resumed by operator", "phase", st.Phase, "rows_done", st.RowsDone)
		}
	}
	if !d.abort.Swap(st.AbortRequested) && st.AbortRequested {
		d.log.Info("abort requested by operator", "phase", st.Phase, "rollback", st.RollbackRequested)
	}
	var approved state.Phase
	if st.ApprovedPhase != nil {
		approved = *st.ApprovedPhase
	}
	if was := d.approved.Swap(approved); was != approved && approved != "" {
		d.log.Info("approved by operator", "phase", approved, "force", st.ForceApproved)
	}
	// approve records the hand-over itself, in sync; the applier's gate has
	// stopped its corrections since, and the applier is told at once.
	var recorded pglogrepl.LSN
	if st.Phase == state.Sync && st.HandoverLSN != nil {
		recorded = *st.HandoverLSN
	}
	if d.approvedHandover.Swap(uint64(recorded)) != uint64(recorded) && recorded != 0 && d.handover.Load() == 0 {
		d.setHandover(recorded)
	}
}

// recordedHandover is the hand-over approve recorded in sync (0: none).
func (d *Daemon) recordedHandover() pglogrepl.LSN { return pglogrepl.LSN(d.approvedHandover.Load()) }

// approvedFor reports whether an operator approved phase.
func (d *Daemon) approvedFor(p state.Phase) bool { return d.approved.Load().(state.Phase) == p }

// abortable is true until the contract DDL has committed.
func abortable(st *state.Migration) bool {
	return !st.Phase.Ended() && !(st.Phase == state.Contract && st.ContractDone > 0)
}

// watch polls the state row for operator actions, publishes live figures,
// and checks that the leader lock's connection lives.
func (d *Daemon) watch(ctx context.Context, stop context.CancelCauseFunc, lock *pgx.Conn) {
	conn, err := dbconn.Connect(ctx, d.cfg.Database.DSN)
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
				d.rlog.Warn("read state", "err", err)
			}
			continue
		}
		d.setControl(st)
		d.obs.progressed()
		if st.AbortRequested && abortable(st) {
			// Everything in hand ends (a cut-over in flight rolls back).
			stop(ErrAborted)
			return
		}
		d.publishStatsOn(ctx, conn, st)
		d.rlog.Flush()
	}
}

// setHandover makes the application the owner of the new columns from lsn
// (0: the expressions again), in the running applier and any later one.
func (d *Daemon) setHandover(lsn pglogrepl.LSN) {
	d.handover.Store(uint64(lsn))
	if p := d.pipe.Load(); p != nil {
		if _, ap := p.current(); ap != nil {
			ap.SetHandover(lsn)
		}
	}
}

// insertLSN is the server's current WAL insert position: every transaction
// committed so far ends before it.
func insertLSN(ctx context.Context, q dbconn.Querier) (pglogrepl.LSN, error) {
	var at string
	if err := q.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&at); err != nil {
		return 0, fmt.Errorf("read the WAL insert position: %w", err)
	}
	return pglogrepl.ParseLSN(at)
}
