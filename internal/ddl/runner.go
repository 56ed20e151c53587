package ddl

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/sessions"
)

// Runner runs schema statements so that they never queue the
// application behind them for longer than LockTimeout: each try waits at
// most that long for its lock, and gives up and retries with backoff.
type Runner struct {
	LockTimeout time.Duration
	MaxRetries  int
	Table       string // quoted table, to name who blocks us
	Log         *slog.Logger
	// OnRetry is told of each failed try (for metrics).
	OnRetry func()
}

// Result is what running one statement cost.
type Result struct {
	Tries    int
	LockWait time.Duration // time spent in tries that timed out
}

// Run runs stmt under lock_timeout in a transaction, and record in the same
// transaction, so a statement that completed is never run again. A
// statement that cannot run in a transaction block (25001, e.g. CREATE
// INDEX CONCURRENTLY) runs on its own, then record runs.
func (d Runner) Run(ctx context.Context, conn *pgx.Conn, stmt string, record func(pgx.Tx) error) (Result, error) {
	var res Result
	backoff := dbconn.NewBackoff(100*time.Millisecond, 10*time.Second)
	for {
		res.Tries++
		start := time.Now()
		err := d.try(ctx, conn, stmt, record)
		if err == nil {
			return res, nil
		}
		if !dbconn.IsLockTimeout(err) {
			return res, fmt.Errorf("DDL %q: %w", stmt, err)
		}
		res.LockWait += time.Since(start)
		blockers := d.Blockers(ctx, conn)
		if d.OnRetry != nil {
			d.OnRetry()
		}
		if res.Tries > d.MaxRetries {
			return res, fmt.Errorf("DDL %q: could not get its lock within ddl.lock_timeout %s in %d tries; blocked by %s; end that session or retry later (raise ddl.max_retries to wait longer)",
				stmt, d.LockTimeout, res.Tries, blockers)
		}
		// The app's queries run freely between tries.
		wait := backoff.Next()
		if d.Log != nil {
			d.Log.Warn("DDL waits for a lock; retrying", "try", res.Tries, "of", d.MaxRetries+1, "lock_timeout", d.LockTimeout,
				"blocked_by", blockers, "retry_in", wait.Round(time.Millisecond), "statement", stmt)
		}
		if err := dbconn.Sleep(ctx, wait); err != nil {
			return res, err
		}
	}
}

func (d Runner) try(ctx context.Context, conn *pgx.Conn, stmt string, record func(pgx.Tx) error) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.Background())
	if err := dbconn.SetLockTimeout(ctx, tx, d.LockTimeout, true); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, stmt); err != nil {
		if dbconn.SQLState(err) == pgerrcode.ActiveSQLTransaction {
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
func (d Runner) outsideTx(ctx context.Context, conn *pgx.Conn, stmt string, record func(pgx.Tx) error) error {
	if err := dbconn.SetLockTimeout(ctx, conn, d.LockTimeout, false); err != nil {
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

// Blockers names the sessions holding locks on the table.
func (d Runner) Blockers(ctx context.Context, conn *pgx.Conn) string {
	held, err := sessions.Describe(ctx, conn, 3, "a.pid IN (SELECT pid FROM pg_locks WHERE relation = $1::regclass AND granted)", d.Table)
	switch {
	case err != nil:
		return "an unknown session (" + err.Error() + ")"
	case held == "":
		return "a session that has since ended"
	}
	return held
}
