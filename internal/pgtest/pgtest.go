package pgtest

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
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/testcontainers/testcontainers-go"
)

// EnvDSN names the environment variable holding the superuser DSN of an
// existing server to use instead of starting one.
const EnvDSN = "CDCBACKFILL_TEST_DSN"

// ErrRestartUnsupported is returned by Restart for a server given by EnvDSN.
var ErrRestartUnsupported = errors.New("pgtest: restart is not supported for a server given by " + EnvDSN)

// ErrNoPostgres is returned by Start when no source of a server works.
var ErrNoPostgres = errors.New("no PostgreSQL available: set " + EnvDSN +
	", start a Docker engine, or install the server (apt-get install -y postgresql)")

// Server is a running PostgreSQL server. Its methods are safe for
// concurrent use.
type Server struct {
	kind string
	logf func(format string, args ...any)

	mu      sync.Mutex
	dsn     string
	stopped bool
	local   *localServer                    // kind "local"
	ctr     *testcontainers.DockerContainer // kind "docker"
}

// Start starts (or attaches to) a server, see the package documentation.
func Start(ctx context.Context) (*Server, error) {
	return StartWithLog(ctx, nil)
}

// StartWithLog is Start writing progress lines to log, which may be nil.
func StartWithLog(ctx context.Context, log io.Writer) (*Server, error) {
	logf := func(string, ...any) {}
	if log != nil {
		logf = func(format string, args ...any) { fmt.Fprintf(log, "pgtest: "+format+"\n", args...) }
	}
	begin := time.Now()

	if dsn := os.Getenv(EnvDSN); dsn != "" {
		if err := checkServer(ctx, dsn); err != nil {
			return nil, fmt.Errorf("%s: %w", EnvDSN, err)
		}
		logf("using the server from %s", EnvDSN)
		return &Server{kind: "env", logf: logf, dsn: dsn}, nil
	}

	var dockerErr error
	if err := dockerAvailable(ctx); err != nil {
		logf("no Docker engine (%v)", err)
	} else {
		ctr, dsn, err := startDocker(ctx)
		if err == nil {
			logf("container %s ready at %s in %s", dockerImage, dsn, time.Since(begin).Round(time.Millisecond))
			return &Server{kind: "docker", logf: logf, dsn: dsn, ctr: ctr}, nil
		}
		dockerErr = err
		logf("docker: %v; trying local binaries", err)
	}

	l, err := startLocal(ctx, logf)
	if err != nil {
		if dockerErr != nil {
			return nil, fmt.Errorf("%w (docker: %v)", err, dockerErr)
		}
		return nil, err
	}
	logf("local PostgreSQL %d ready at %s in %s", l.major, l.dsn(), time.Since(begin).Round(time.Millisecond))
	return &Server{kind: "local", logf: logf, dsn: l.dsn(), local: l}, nil
}

// Kind tells where the server comes from: "env", "docker" or "local".
func (s *Server) Kind() string { return s.kind }

// BinDir returns the directory of the local server binaries (initdb,
// postgres, pgbench...) when known, else "".
func (s *Server) BinDir() string {
	if s.local != nil {
		return s.local.binDir
	}
	return ""
}

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
// directory, container). It does not touch a server given by EnvDSN.
// Stop is idempotent.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	switch {
	case s.local != nil:
		if err := s.local.stop(); err != nil {
			return fmt.Errorf("stop local server: %w", err)
		}
	case s.ctr != nil:
		if err := testcontainers.TerminateContainer(s.ctr); err != nil {
			return fmt.Errorf("stop container: %w", err)
		}
	}
	return nil
}

// Restart stops the server and starts it again with the same data. A local
// server keeps its port; a container may get another one, which DSN then
// reflects. It returns ErrRestartUnsupported for a server given by EnvDSN.
func (s *Server) Restart(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errors.New("pgtest: restart of a stopped server")
	}
	begin := time.Now()
	switch {
	case s.local != nil:
		if err := s.local.restart(ctx); err != nil {
			return fmt.Errorf("restart local server: %w", err)
		}
	case s.ctr != nil:
		dsn, err := restartDocker(ctx, s.ctr)
		if err != nil {
			return fmt.Errorf("restart container: %w", err)
		}
		s.dsn = dsn
	default:
		return ErrRestartUnsupported
	}
	s.logf("restarted in %s", time.Since(begin).Round(time.Millisecond))
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

// checkServer connects to dsn and checks that the server can do logical
// decoding.
func checkServer(ctx context.Context, dsn string) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.Background())
	var level string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&level); err != nil {
		return fmt.Errorf("show wal_level: %w", err)
	}
	if level != "logical" {
		return fmt.Errorf("wal_level is %q, need logical", level)
	}
	return nil
}

// waitReady polls dsn until the server accepts connections, ctx ends, one
// minute passes or exited (which may be nil) is closed.
func waitReady(ctx context.Context, dsn string, exited <-chan struct{}) error {
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
