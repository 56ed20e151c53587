package phases

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// DDLRunner runs schema statements so that they never queue the
// application behind them for longer than LockTimeout: each try waits at
// most that long for its lock, and gives up and retries with backoff.
type DDLRunner struct {
	LockTimeout time.Duration
	MaxRetries  int
	Table       string // quoted table, to name who blocks us
	Log         *slog.Logger
	// OnRetry is told of each failed try (for metrics).
	OnRetry func()
}

// DDLResult is what running one statement cost.
type DDLResult struct {
	Tries    int
	LockWait time.Duration // time spent in tries that timed out
}

// Run runs stmt under lock_timeout in a transaction, and record in the same
// transaction, so a statement that completed is never run again. A
// statement that cannot run in a transaction block (25001, e.g. CREATE
// INDEX CONCURRENTLY) runs on its own, then record runs.
func (d DDLRunner) Run(ctx context.Context, conn *pgx.Conn, stmt string, record func(pgx.Tx) error) (DDLResult, error) {
	var res DDLResult
	backoff := 100 * time.Millisecond
	for {
		res.Tries++
		start := time.Now()
		err := d.try(ctx, conn, stmt, record)
		if err == nil {
			return res, nil
		}
		if !isLockTimeout(err) {
			return res, fmt.Errorf("DDL %q: %w", stmt, err)
		}
		res.LockWait += time.Since(start)
		blockers := d.blockers(ctx, conn)
		if d.OnRetry != nil {
			d.OnRetry()
		}
		if res.Tries > d.MaxRetries {
			return res, fmt.Errorf("DDL %q: could not get its lock within ddl.lock_timeout %s in %d tries; blocked by %s; end that session or retry later (raise ddl.max_retries to wait longer)",
				stmt, d.LockTimeout, res.Tries, blockers)
		}
		// Exponential backoff with full jitter, capped: the app's queries
		// run freely between tries.
		wait := time.Duration(rand.Int64N(int64(backoff))) + backoff/2
		if d.Log != nil {
			d.Log.Warn("DDL waits for a lock; retrying", "try", res.Tries, "of", d.MaxRetries+1, "lock_timeout", d.LockTimeout,
				"blocked_by", blockers, "retry_in", wait.Round(time.Millisecond), "statement", stmt)
		}
		if err := sleep(ctx, wait); err != nil {
			return res, err
		}
		backoff = min(backoff*2, 10*time.Second)
	}
}

func (d DDLRunner) try(ctx context.Context, conn *pgx.Conn, stmt string, record func(pgx.Tx) error) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = %d", d.lockTimeoutMS())); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, stmt); err != nil {
		if sqlState(err) == "25001" {
			tx.Rollback(ctx)
			return d.outsideTx(ctx, conn, stmt, record)
		}
		return err
	}
	if err := record(tx); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// outsideTx runs a statement that refuses transaction blocks. Its record
// cannot be atomic with it: such statements (CONCURRENTLY) are the ones
// written to be rerun safely with IF NOT EXISTS.
func (d DDLRunner) outsideTx(ctx context.Context, conn *pgx.Conn, stmt string, record func(pgx.Tx) error) error {
	if _, err := conn.Exec(ctx, fmt.Sprintf("SET lock_timeout = %d", d.lockTimeoutMS())); err != nil {
		return err
	}
	_, err := conn.Exec(ctx, stmt)
	if _, rerr := conn.Exec(ctx, "RESET lock_timeout"); err == nil && rerr != nil {
		return rerr
	}
	if err != nil {
		return err
	}
	return pgx.BeginFunc(ctx, conn, record)
}

// blockers names the sessions holding locks on the table.
func (d DDLRunner) blockers(ctx context.Context, conn *pgx.Conn) string {
	rows, err := conn.Query(ctx, `SELECT a.pid, coalesce(a.state, ''), coalesce(now() - a.xact_start, '0'), left(a.query, 200)
		FROM pg_stat_activity a
		WHERE a.pid IN (SELECT pid FROM pg_locks WHERE relation = $1::regclass AND granted) AND a.pid <> pg_backend_pid()
		ORDER BY a.xact_start LIMIT 3`, d.Table)
	if err != nil {
		return "an unknown session (" + err.Error() + ")"
	}
	defer rows.Close()
	var parts []string
	for rows.Next() {
		var pid int
		var state, query string
		var age time.Duration
		if rows.Scan(&pid, &state, &age, &query) == nil {
			parts = append(parts, fmt.Sprintf("pid %d (%s for %s: %q)", pid, state, age.Round(time.Second), query))
		}
	}
	if len(parts) == 0 {
		return "a session that has since ended"
	}
	return strings.Join(parts, ", ")
}

// sleep is the one place phases waits on the clock.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// lockTimeoutMS is at least 1: lock_timeout = 0 would mean no time-out,
// the one value that could queue the application behind the DDL for good.
func (d DDLRunner) lockTimeoutMS() int64 { return max(d.LockTimeout.Milliseconds(), 1) }
