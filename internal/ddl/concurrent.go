package ddl

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/sessions"
)

// DefaultConcurrentTimeout bounds the waits of a CONCURRENTLY build: its
// lock (SHARE UPDATE EXCLUSIVE) queues no application statement, so it may
// wait minutes, for every older snapshot of the database, where
// ddl.lock_timeout (seconds) is meant for locks that queue the application.
const DefaultConcurrentTimeout = 10 * time.Minute

// IndexBuild runs CREATE [UNIQUE] INDEX CONCURRENTLY so that it ends with a
// valid index or an error, never with an INVALID one taken for done: a
// build that fails (a time-out, a cancel, a lost connection) leaves an
// INVALID index behind, which IF NOT EXISTS would then skip. So every try
// starts from the catalog: a valid index of that name is done (a restart
// never builds twice), an invalid one is dropped CONCURRENTLY and built
// again.
type IndexBuild struct {
	SQL    string // the CREATE INDEX CONCURRENTLY statement
	Schema string // the index's schema ("" : the table's, public)
	Name   string // the index's name
	// Timeout is the lock_timeout of the build and of the drop of a
	// leftover (default DefaultConcurrentTimeout).
	Timeout    time.Duration
	MaxRetries int
	Log        *slog.Logger // may be nil
	// Waiting, when set, is told every few seconds what the build waits
	// for or how far it got ("" once it ended), for status.
	Waiting func(string)
	// Allow, when set, runs before each try; an error ends the build (the
	// throttle: not while paused, not while a standby or the slot lags).
	Allow func(ctx context.Context) error
}

// IndexState is what the catalog says of an index.
type IndexState int

const (
	IndexMissing IndexState = iota
	IndexValid
	IndexInvalid // a failed CONCURRENTLY build's leftover, or one under way
)

// LookupIndex reads the state of index schema.name ("" schema: any on the
// search path).
func LookupIndex(ctx context.Context, q dbconn.Querier, schema, name string) (IndexState, error) {
	var valid *bool
	err := q.QueryRow(ctx, `SELECT i.indisvalid AND i.indisready
		FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.relname = $2 AND (n.nspname = $1 OR ($1 = '' AND pg_catalog.pg_table_is_visible(c.oid)))`, schema, name).Scan(&valid)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return IndexMissing, nil
	case err != nil:
		return 0, fmt.Errorf("look up index %s: %w", name, err)
	case valid != nil && *valid:
		return IndexValid, nil
	}
	return IndexInvalid, nil
}

func (b IndexBuild) ident() string {
	if b.Schema == "" {
		return pgx.Identifier{b.Name}.Sanitize()
	}
	return pgx.Identifier{b.Schema, b.Name}.Sanitize()
}

func (b IndexBuild) timeout() time.Duration {
	if b.Timeout <= 0 {
		return DefaultConcurrentTimeout
	}
	return b.Timeout
}

// Run builds the index on conn (which must not be in a transaction) and
// returns the number of tries.
func (b IndexBuild) Run(ctx context.Context, conn *pgx.Conn) (int, error) {
	backoff := dbconn.NewBackoff(time.Second, 30*time.Second)
	for try := 1; ; try++ {
		st, err := LookupIndex(ctx, conn, b.Schema, b.Name)
		if err != nil {
			return try, err
		}
		switch st {
		case IndexValid:
			b.say("")
			return try, nil
		case IndexInvalid:
			b.logf("index: dropping the INVALID index a failed build left, to build it again", "index", b.ident())
			if err := b.exec(ctx, conn, "DROP INDEX CONCURRENTLY IF EXISTS "+b.ident()); err != nil {
				return try, fmt.Errorf("drop the INVALID index %s: %w", b.ident(), err)
			}
		}
		if b.Allow != nil {
			if err := b.Allow(ctx); err != nil {
				return try, err
			}
		}
		err = b.build(ctx, conn)
		if err == nil {
			continue // the catalog says whether it is valid
		}
		if ctx.Err() != nil {
			return try, ctx.Err()
		}
		if !retryable(err) {
			// A data problem (a duplicate for a unique index): building
			// again gives the same; leave no INVALID index behind.
			if st, lerr := LookupIndex(ctx, conn, b.Schema, b.Name); lerr == nil && st == IndexInvalid {
				_ = b.exec(ctx, conn, "DROP INDEX CONCURRENTLY IF EXISTS "+b.ident())
			}
			return try, fmt.Errorf("CREATE INDEX CONCURRENTLY %s: %w", b.ident(), err)
		}
		if try > b.MaxRetries {
			return try, fmt.Errorf("CREATE INDEX CONCURRENTLY %s did not finish in %d tries (last: %v); end the sessions named in the log, or raise ddl.concurrent_timeout", b.ident(), try, err)
		}
		wait := backoff.Next()
		b.logf("index: the build failed; the leftover is dropped and the build retried", "index", b.ident(), "try", try, "error", err, "retry_in", wait.Round(time.Millisecond))
		if err := dbconn.Sleep(ctx, wait); err != nil {
			return try, err
		}
	}
}

// retryable errors are the ones a later try can avoid: a lock or snapshot
// wait that timed out, a cancel or termination, a lost connection, a
// deadlock with another builder.
func retryable(err error) bool {
	switch dbconn.SQLState(err) {
	case pgerrcode.LockNotAvailable, pgerrcode.QueryCanceled, pgerrcode.AdminShutdown, pgerrcode.DeadlockDetected,
		pgerrcode.CrashShutdown, pgerrcode.CannotConnectNow:
		return true
	}
	return dbconn.IsConnLoss(err)
}

// build runs the statement once, telling Waiting what it waits for.
func (b IndexBuild) build(ctx context.Context, conn *pgx.Conn) error {
	pid, cfg := conn.PgConn().PID(), conn.Config().Copy()
	wctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.watch(wctx, cfg, pid)
	}()
	err := b.exec(ctx, conn, b.SQL)
	stop()
	<-done
	b.say("")
	return err
}

// exec runs sql outside a transaction under the build's lock_timeout.
func (b IndexBuild) exec(ctx context.Context, conn *pgx.Conn, sql string) error {
	if err := dbconn.SetLockTimeout(ctx, conn, b.timeout(), false); err != nil {
		return err
	}
	_, err := conn.Exec(ctx, sql)
	if _, rerr := conn.Exec(context.WithoutCancel(ctx), "RESET lock_timeout"); err == nil && rerr != nil && !dbconn.IsConnLoss(rerr) {
		return rerr
	}
	return err
}

// watch reports, every few seconds on a connection of its own, the build's
// progress (pg_stat_progress_create_index) and, while it waits for older
// snapshots or lockers, the sessions it waits for.
func (b IndexBuild) watch(ctx context.Context, cfg *pgx.ConnConfig, pid uint32) {
	if pid == 0 || (b.Waiting == nil && b.Log == nil) {
		return
	}
	if err := dbconn.Sleep(ctx, 2*time.Second); err != nil {
		return
	}
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	lastSaid := ""
	for ctx.Err() == nil {
		if conn == nil {
			c, err := pgx.ConnectConfig(ctx, cfg)
			if err != nil {
				return
			}
			conn = c
		}
		msg := progress(ctx, conn, pid)
		b.say(msg)
		if msg != lastSaid && msg != "" {
			b.logf("index: build under way", "index", b.ident(), "progress", msg)
			lastSaid = msg
		}
		if err := dbconn.Sleep(ctx, 5*time.Second); err != nil {
			return
		}
	}
}

// progress says where build pid stands, naming the sessions it waits for.
func progress(ctx context.Context, q dbconn.Querier, pid uint32) string {
	var phase string
	var blocksDone, blocksTotal, lockersDone, lockersTotal int64
	var locker *int64
	err := q.QueryRow(ctx, `SELECT phase, blocks_done, blocks_total, lockers_done, lockers_total, nullif(current_locker_pid, 0)
		FROM pg_stat_progress_create_index WHERE pid = $1`, int64(pid)).Scan(&phase, &blocksDone, &blocksTotal, &lockersDone, &lockersTotal, &locker)
	if err != nil {
		return ""
	}
	msg := "building index: " + phase
	if blocksTotal > 0 {
		msg += fmt.Sprintf(", %d%% of the table's blocks", 100*blocksDone/blocksTotal)
	}
	if locker != nil {
		who, err := sessions.Describe(ctx, q, 1, "a.pid = $1", *locker)
		if err == nil && who != "" {
			msg += fmt.Sprintf(" (waiting for %d of %d sessions whose snapshots or locks are older: %s)", lockersTotal-lockersDone, lockersTotal, who)
		}
	}
	return msg
}

func (b IndexBuild) say(msg string) {
	if b.Waiting != nil {
		b.Waiting(msg)
	}
}

func (b IndexBuild) logf(msg string, args ...any) {
	if b.Log != nil {
		b.Log.Info(msg, args...)
	}
}
