package phases

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

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
	// finish is what the new columns become (indexes, NOT NULL,
	// constraints) and the expand and contract lists as they run.
	finish *ddl.Finish
	conn   *pgx.Conn     // the conductor's own connection: state, DDL
	pool   *pgxpool.Pool // reads from several goroutines (throttle, checks)

	control control     // the operator's flags, from the state row (machine.go)
	repl    replication // the stream and applier, and what they are given (pipeline.go)
	parity  *paritySink // what the applier and verify find out of parity (parity.go)
	figures figures     // what status and the HTTP window show (stats.go)
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
		ledThisTime, err := runOnce(ctx, cfg, log, obs)
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

// runOnce is one daemon's life: look, lead, conduct. led says whether it
// took the leader lock.
func runOnce(ctx context.Context, cfg *config.Config, log *slog.Logger, obs *observer) (led bool, err error) {
	log = log.With("migration", cfg.Name)
	d := &Daemon{cfg: cfg, log: log, rlog: repeatlog.New(log, 0), store: state.Store{Name: cfg.Name}}
	d.control.approved.Store(state.Phase(""))
	d.repl.originMode.Store("")
	d.figures.obs = obs
	d.figures.waiting.Store("")
	defer obs.leader.Store(false)
	defer d.rlog.End() // what it counted is over with this daemon's run

	conn, err := dbconn.Connect(ctx, cfg.Database.DSN)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	d.conn = conn
	if err := d.lookFirst(ctx); err != nil {
		return false, err
	}
	if err := state.EnsureSchema(ctx, conn, cfg.DDL.LockTimeout); err != nil {
		return false, err
	}

	lock, err := d.lead(ctx)
	if err != nil || lock == nil {
		return false, err
	}
	defer lock.Close(context.Background())
	obs.leader.Store(true)
	obs.progressed()

	pool, err := openPool(ctx, cfg.Database.DSN)
	if err != nil {
		return true, err
	}
	defer pool.Close()
	d.pool = pool
	if err := d.takeOver(ctx); err != nil {
		return true, err
	}
	return true, d.conduct(ctx, lock)
}

// lookFirst looks before touching: a migration that has not started is
// checked as plan checks it, and nothing is created when a check fails.
func (d *Daemon) lookFirst(ctx context.Context) error {
	st, err := d.store.Load(ctx, d.conn)
	if err != nil && !errors.Is(err, state.ErrNoMigration) {
		return err
	}
	if st != nil && st.Phase != state.Expand {
		return nil
	}
	report, err := Inspect(ctx, d.cfg)
	if err != nil {
		return err
	}
	if err := report.Err(); err != nil {
		return err
	}
	for _, a := range report.Allowed {
		d.log.Warn("ddl: a statement the rules refuse will run, allowed explicitly", "statement", a)
	}
	return nil
}

// openPool opens the pool for reads from several goroutines.
func openPool(ctx context.Context, dsn string) (*pgxpool.Pool, error) {
	pcfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("database.dsn %s does not parse", dbconn.RedactDSN(dsn))
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = dbconn.ApplicationName
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", dbconn.RedactDSN(dsn), dbconn.Redact(err, pcfg.ConnConfig.Password))
	}
	return pool, nil
}

// takeOver makes the state row this daemon's and reads the table.
func (d *Daemon) takeOver(ctx context.Context) error {
	if err := d.store.Create(ctx, d.conn); err != nil {
		return err
	}
	// A daemon leads now: the last one's fatal error is history (the event
	// log keeps what happened), and status must not show it as current.
	if err := d.store.SetError(ctx, d.conn, nil); err != nil {
		return err
	}
	if err := d.loadTable(ctx); err != nil {
		return err
	}
	d.parity = newParitySink(d.store, d.pool, d.table, d.cfg.DualWrite.Detect, d.rlog)
	return nil
}

// conduct runs the phases with the watcher beside them, carries out an
// abort, and leaves the state row saying how it ended.
func (d *Daemon) conduct(ctx context.Context, lock *pgx.Conn) error {
	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		d.watch(wctx, cancel, lock)
	}()
	err := d.phases(wctx)
	if cause := context.Cause(wctx); errors.Is(cause, ErrAborted) || errors.Is(err, ErrAborted) {
		err = d.performAbort(context.WithoutCancel(ctx))
	} else if err == nil && cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause // the watcher failed (lost leadership, no connection)
	}
	cancel(nil)
	<-watchDone
	d.repl.stopPipeline()
	if err != nil && ctx.Err() == nil {
		msg := err.Error()
		_ = d.store.SetError(context.Background(), d.conn, &msg)
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
	d.repl.sources = src
}
