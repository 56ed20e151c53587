package demo

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/pgserver"
	"github.com/cdcbackfill/cdcbackfill/internal/workload"
	"github.com/cdcbackfill/cdcbackfill/phases"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// Options of one demo run.
type Options struct {
	Rows int       // rows in users at the start
	Out  io.Writer // where the story is told; redrawn in place when a terminal
}

// The application's load: a few writers at a steady rate, enough for the
// stream to have work in every phase, not enough to hide the daemon's.
const (
	writers      = 3
	appTxPerSec  = 200
	migration    = "split_full_name"
	tickEvery    = 250 * time.Millisecond
	logTailLines = 20
)

// ErrInterrupted is returned when ctx ended before the story did.
var ErrInterrupted = errors.New("demo interrupted; PostgreSQL stopped")

// Run tells the whole story: start PostgreSQL, seed users, start the
// application, run the daemon in-process until done while the application
// goes through its releases, then print the summary and parity. It returns
// an error when the migration did not reach done, parity failed, or ctx
// ended; the server is stopped in every case.
func Run(ctx context.Context, o Options) (err error) {
	if o.Rows < 1 {
		return fmt.Errorf("--rows must be at least 1, got %d", o.Rows)
	}
	out := o.Out
	fmt.Fprintln(out, "cdcbackfill demo: split users.full_name into first_name and last_name while an application writes")

	srv, err := startServer(ctx, out)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, srv.stop(out)) }()

	db, dsn, err := srv.CreateDatabase(ctx, "demo")
	srv.db = db
	if err != nil {
		return interrupted(ctx, err)
	}
	begin := time.Now()
	if err := seed(ctx, dsn, o.Rows); err != nil {
		return interrupted(ctx, err)
	}
	fmt.Fprintf(out, "users: %d rows of full_name 'firstN lastN', seeded in %s\n", o.Rows, roundDuration(time.Since(begin)))

	logFile, err := os.CreateTemp("", "cdcbackfill-demo-*.log")
	if err != nil {
		return fmt.Errorf("create the daemon's log file: %w", err)
	}
	keepLog := false
	defer func() {
		logFile.Close()
		if !keepLog {
			os.Remove(logFile.Name())
		}
	}()
	logger := slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelInfo}))

	sum, runErr := story(ctx, out, dsn, o.Rows, logger)
	if ctx.Err() != nil {
		fmt.Fprintln(out, "interrupted: stopping the application, the daemon and PostgreSQL")
		return ErrInterrupted
	}
	if sum != nil {
		sum.Print(out)
	}
	if runErr != nil {
		keepLog = true
		printLogTail(out, logFile.Name())
		return runErr
	}
	if !sum.Parity.OK() {
		return errors.New("demo: parity failed: the migrated table differs from what the application wrote")
	}
	return nil
}

// story runs the application and the daemon against the seeded database
// and returns the summary; the error tells what went wrong with the
// migration (the summary is still filled in as far as it goes).
func story(ctx context.Context, out io.Writer, dsn string, rows int, logger *slog.Logger) (*Summary, error) {
	cfg := migrationConfig(dsn)
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("demo config: %w", err)
	}
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("connect the application: %w", err)
	}
	defer pool.Close()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("connect the observer: %w", err)
	}
	defer conn.Close(context.Background())

	app := workload.Start(pool, workload.Options{Writers: writers, Pause: time.Second * writers / appTxPerSec,
		MaxID: int64(rows), Seed: 2718, Expected: "demo_expected"})
	defer app.Stop()
	fmt.Fprintf(out, "app: %d writers, about %d transactions/s (renames, sign-ups, deletes), %s\n", writers, appTxPerSec, app.Release())
	fmt.Fprintln(out, "daemon: running in-process (dual_write.detect auto, contract_policy auto)")

	dctx, stopDaemon := context.WithCancel(ctx)
	defer stopDaemon()
	daemonErr := make(chan error, 1)
	go func() { daemonErr <- phases.Run(dctx, cfg, logger) }()

	p := &progress{out: out, redraw: isTerminal(out), cfg: cfg, conn: conn}
	shown := app.Release()
	// deploy follows the migration with the application's releases; the
	// last one ships by itself when a write finds full_name gone.
	deploy := func() {
		if p.status != nil && p.status.Phase != state.Expand && p.status.Phase != state.Backfill {
			app.Deploy(workload.WritesBoth)
		}
		if rel := app.Release(); rel != shown {
			shown = rel
			p.println("          app       deploys " + rel.String())
		}
	}
	tick := time.NewTicker(tickEvery)
	defer tick.Stop()
	var runErr error
wait:
	for {
		select {
		case <-ctx.Done():
			<-daemonErr
			return nil, ctx.Err()
		case runErr = <-daemonErr:
			break wait
		case <-tick.C:
			p.observe(ctx)
			deploy()
		}
	}
	p.observe(ctx)
	if runErr == nil && p.status != nil && p.status.Phase == state.Done {
		// The application finds out that full_name is gone on its next write.
		for deadline := time.Now().Add(10 * time.Second); app.Release() != workload.WritesNew && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		deploy()
		time.Sleep(200 * time.Millisecond) // a few writes of the last release
	}
	app.Stop()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	sum := &Summary{Rows: int64(rows), PeakLag: p.peakLag}
	sum.AppTxs, sum.AppFailed = app.Transactions()
	if f := app.Failures(); len(f) > 0 {
		sum.AppFirstErr = f[0].Err.Error()
	}
	if err := sum.readHistory(ctx, conn, cfg.Name); err != nil {
		return sum, errors.Join(runErr, err)
	}
	if r, err := phases.Status(ctx, cfg); err == nil {
		sum.BackfillRows, sum.Corrections = r.Backfill.RowsDone, r.Sync.Corrections
		p.status = r
	}
	if sum.Parity, err = checkParity(ctx, conn); err != nil {
		return sum, errors.Join(runErr, err)
	}
	if runErr != nil {
		return sum, fmt.Errorf("demo: the daemon failed: %w", runErr)
	}
	if p.status == nil || p.status.Phase != state.Done {
		phase := "unknown"
		if p.status != nil {
			phase = string(p.status.Phase)
		}
		return sum, fmt.Errorf("demo: the migration stopped in phase %s, not done", phase)
	}
	return sum, nil
}

// migrationConfig is the running example of DESIGN.md, with nobody to
// approve and short waits so the story fits in a minute.
func migrationConfig(dsn string) *config.Config {
	cfg := config.Default()
	cfg.Name = migration
	cfg.Database.DSN = dsn
	cfg.Table = "public.users"
	cfg.Expand = []string{"ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text"}
	cfg.Columns = []config.Column{
		{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"},
		{Name: "last_name", Expr: "split_part(full_name, ' ', 2)"},
	}
	cfg.Contract = []string{"ALTER TABLE users DROP COLUMN full_name"}
	cfg.DualWrite.Detect, cfg.DualWrite.QuietPeriod, cfg.DualWrite.MinEvidence = config.DetectAuto, 3*time.Second, 100
	cfg.ContractPolicy.Mode, cfg.ContractPolicy.Hold = config.ContractAuto, 3*time.Second
	cfg.HTTP.Listen = ""
	return cfg
}

// seed creates users with rows rows and the application's record of what
// each row's new columns must hold.
func seed(ctx context.Context, dsn string, rows int) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("seed: connect: %w", err)
	}
	defer conn.Close(context.Background())
	for _, sql := range []string{
		`CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text)`,
		`INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'user' || g || '@example.com' FROM generate_series(1, $1::bigint) g`,
		`CREATE TABLE demo_expected (id bigint PRIMARY KEY, first_name text, last_name text)`,
		`INSERT INTO demo_expected SELECT g, 'first' || g, 'last' || g FROM generate_series(1, $1::bigint) g`,
	} {
		var args []any
		if strings.Contains(sql, "$1") {
			args = []any{rows}
		}
		if _, err := conn.Exec(ctx, sql, args...); err != nil {
			return fmt.Errorf("seed: %w", err)
		}
	}
	if _, err := conn.Exec(ctx, `ANALYZE users, demo_expected`); err != nil {
		return fmt.Errorf("seed: analyze: %w", err)
	}
	return nil
}

// server is the embedded PostgreSQL of one demo run.
type server struct {
	*pgserver.Server
	dataDir string // local servers: removed by Stop, checked after
	db      string // the demo's database
}

// startServer starts the embedded PostgreSQL and prints where it runs. A
// first run on a machine without the server binaries shows their download
// or installation; the starter's other lines are shown only when it fails.
func startServer(ctx context.Context, out io.Writer) (*server, error) {
	o, err := pgserver.OptionsFromEnv()
	if err != nil {
		return nil, err
	}
	var startLog bytes.Buffer
	o.Logf = func(format string, args ...any) { fmt.Fprintf(&startLog, format+"\n", args...) }
	o.Progress = out
	pg, err := pgserver.Start(ctx, o)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ErrInterrupted
		}
		return nil, fmt.Errorf("start PostgreSQL: %w\n%s", err, startLog.String())
	}
	srv := &server{Server: pg}
	var version string
	conn, err := pgx.Connect(ctx, srv.DSN())
	if err == nil {
		err = conn.QueryRow(ctx, `SELECT current_setting('server_version'), current_setting('data_directory')`).Scan(&version, &srv.dataDir)
		conn.Close(context.Background())
	}
	if err != nil {
		return nil, errors.Join(interrupted(ctx, fmt.Errorf("ask PostgreSQL its version: %w", err)), srv.stop(io.Discard))
	}
	where := "data directory " + srv.dataDir
	if srv.Kind() != "local" {
		where = srv.Kind() + " server"
	}
	fmt.Fprintf(out, "PostgreSQL %s running at %s (%s)\n", version, srv.DSN(), where)
	return srv, nil
}

// stop stops the server, or drops the demo's database on a server given by
// the environment, and says so.
func (s *server) stop(out io.Writer) error {
	if s.Kind() == "env" {
		if s.db == "" {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := s.DropDatabase(ctx, s.db); err != nil {
			return err
		}
		fmt.Fprintf(out, "database %s dropped; the server from %s keeps running\n", s.db, pgserver.EnvDSN)
		return nil
	}
	if err := s.Stop(); err != nil {
		return fmt.Errorf("stop PostgreSQL: %w", err)
	}
	if s.Kind() != "local" {
		fmt.Fprintln(out, "PostgreSQL stopped")
		return nil
	}
	if _, err := os.Stat(s.dataDir); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("PostgreSQL stopped but its data directory %s is still there", s.dataDir)
	}
	fmt.Fprintf(out, "PostgreSQL stopped; data directory %s removed\n", s.dataDir)
	return nil
}

// interrupted turns an error caused by ctx ending into ErrInterrupted.
func interrupted(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ErrInterrupted
	}
	return err
}

// printLogTail shows the last lines of the daemon's log, which is kept.
func printLogTail(out io.Writer, path string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	var tail []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		tail = append(tail, sc.Text())
		if len(tail) > logTailLines {
			tail = tail[1:]
		}
	}
	fmt.Fprintf(out, "last lines of the daemon's log (all of it in %s):\n", filepath.Clean(path))
	for _, l := range tail {
		fmt.Fprintln(out, "  "+l)
	}
}
