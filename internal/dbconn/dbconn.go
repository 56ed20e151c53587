// Package dbconn holds the small database helpers every package of the
// daemon shares: connecting with a time-out and an error that names the
// server without its password, the leader lock, quoting for the few places
// where a bind parameter is not allowed, SQLSTATE classes, setting
// lock_timeout (never to 0, which means none), and the one sleep that ends
// with its context.
//
// Invariant: no error it returns carries a password, and every error wraps
// its cause (%w), so errors.As finds *pgconn.PgError and pgconn's
// connection errors wherever they are checked.
package dbconn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Querier is what a statement needs: a connection, a pool or a transaction.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ConnectTimeout bounds how long a connection attempt waits for a server
// that does not answer.
const ConnectTimeout = 10 * time.Second

// ApplicationName marks the daemon's sessions in pg_stat_activity.
const ApplicationName = "cdcbackfill"

// Connect opens one connection with a time-out; its error names the server
// (redacted DSN) and wraps the cause. It sets no setting a stable
// expression reads (TimeZone, DateStyle...): the session has the database's
// and role's defaults, or what the DSN says, and plan prints them.
func Connect(ctx context.Context, dsn string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("database.dsn %s does not parse", RedactDSN(dsn))
	}
	if cfg.ConnectTimeout == 0 || cfg.ConnectTimeout > ConnectTimeout {
		cfg.ConnectTimeout = ConnectTimeout
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = ApplicationName
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", RedactDSN(dsn), Redact(err, cfg.Password))
	}
	return conn, nil
}

// Redact hides password in err's text and keeps err as its cause.
func Redact(err error, password string) error {
	if err == nil || password == "" || !strings.Contains(err.Error(), password) {
		return err
	}
	return &redacted{err: err, password: password}
}

type redacted struct {
	err      error
	password string
}

func (e *redacted) Error() string { return strings.ReplaceAll(e.err.Error(), e.password, "xxxxx") }
func (e *redacted) Unwrap() error { return e.err }

// QuoteLiteral quotes s as a SQL string literal, for the statements that
// take no bind parameter (SET TRANSACTION SNAPSHOT, replication commands).
func QuoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// Sleep waits for d or until ctx ends (then it returns ctx.Err()). It is
// the one place the daemon waits on the clock.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// SQLState returns the SQLSTATE of a server error, or "".
func SQLState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// IsLockTimeout reports a statement ended by lock_timeout.
func IsLockTimeout(err error) bool { return SQLState(err) == pgerrcode.LockNotAvailable }

// IsConnLoss is true for errors that mean the database went away (a
// restart, a terminated session, a network cut), not that a request was
// wrong.
func IsConnLoss(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		return true
	}
	var netErr *net.OpError
	var connErr *pgconn.ConnectError
	if errors.As(err, &netErr) || errors.As(err, &connErr) {
		return true
	}
	switch s := SQLState(err); {
	case s == pgerrcode.AdminShutdown, s == pgerrcode.CrashShutdown, s == pgerrcode.CannotConnectNow,
		pgerrcode.IsConnectionException(s):
		return true
	case s != "":
		return false
	}
	// pgx reports a use of a connection it already closed as a plain
	// "conn closed" error, with no type to match.
	return pgconn.SafeToRetry(err) || pgconn.Timeout(err) || strings.Contains(err.Error(), "conn closed")
}

// leaderKey is the advisory lock key of a migration: one daemon holds it
// (the leader); others wait as standbys.
const leaderKey = `hashtextextended('cdcbackfill:' || $1, 0)`

// TryLeaderLock takes the migration's leader lock on q's session if it is
// free.
func TryLeaderLock(ctx context.Context, q Querier, name string) (bool, error) {
	var got bool
	if err := q.QueryRow(ctx, `SELECT pg_try_advisory_lock(`+leaderKey+`)`, name).Scan(&got); err != nil {
		return false, fmt.Errorf("take the leader lock of %q: %w", name, err)
	}
	return got, nil
}

// LeaderRunning reports whether a session holds the migration's leader
// lock, without taking it: a daemon runs it.
func LeaderRunning(ctx context.Context, q Querier, name string) (bool, error) {
	var held bool
	err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks
		WHERE locktype = 'advisory' AND granted AND objsubid = 1
		  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND ((classid::bigint << 32) | objid::bigint) = `+leaderKey+`)`, name).Scan(&held)
	if err != nil {
		return false, fmt.Errorf("look for the leader of %q: %w", name, err)
	}
	return held, nil
}
