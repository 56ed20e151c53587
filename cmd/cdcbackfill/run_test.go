package main

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/workload"
)

// daemon is a `cdcbackfill run` in the background (workload.Daemon), with
// the test's failures.
type daemon struct{ *workload.Daemon }

func startDaemon(t *testing.T, config string) *daemon {
	t.Helper()
	d, err := workload.StartDaemon(binary, config, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Kill)
	return &daemon{d}
}

func (d *daemon) output() string { return d.Output() }
func (d *daemon) kill()          { d.Kill() }

// wait for the daemon to exit, at most timeout.
func (d *daemon) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	code, ok := d.Wait(timeout)
	if !ok {
		t.Fatalf("daemon did not exit in %s\n%s", timeout, d.output())
	}
	return code
}

// waitFor polls cond until it holds, failing the test after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func query[T any](t *testing.T, pool *pgxpool.Pool, sql string, args ...any) T {
	t.Helper()
	var v T
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&v); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return v
}

func phase(t *testing.T, pool *pgxpool.Pool) string {
	t.Helper()
	var p string
	err := pool.QueryRow(context.Background(), `SELECT phase FROM cdcbackfill.migrations WHERE name = 'split_full_name'`).Scan(&p)
	if err != nil {
		return ""
	}
	return p
}

// startWriters starts an application of the old release that inserts,
// renames, changes emails and deletes, at a steady pace (the daemon shares
// 2 cores), recording nothing.
func startWriters(t *testing.T, pool *pgxpool.Pool, n int, maxID int64) *workload.App {
	w := workload.Start(pool, workload.Options{Writers: n, Pause: 2 * time.Millisecond, MaxID: maxID, Seed: 7,
		Mix: workload.Mix{SignUps: 2, Renames: 4, Emails: 2, Deletes: 2}})
	t.Cleanup(w.Stop)
	return w
}

// mismatches counts rows whose new columns differ from the expressions,
// by SQL independent of the daemon.
func mismatches(t *testing.T, pool *pgxpool.Pool) int64 {
	t.Helper()
	n, err := workload.OutOfParity(context.Background(), pool)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// caughtUp is true when the slot has confirmed all WAL written so far.
func caughtUp(t *testing.T, pool *pgxpool.Pool, target string) bool {
	return query[bool](t, pool, `SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cdcbackfill_split_full_name'`, target)
}

func seed(t *testing.T, rows int) (string, *pgxpool.Pool) {
	dsn := pgtest.NewDatabase(t)
	exec1(t, dsn, `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text)`,
		fmt.Sprintf(`INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'u' || g FROM generate_series(1, %d) g`, rows),
		`ANALYZE users`)
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return dsn, pool
}

// TestBackfillAndSyncUnderLoad is the user's story: a 200k-row table, the
// application writing the whole time; the daemon expands, backfills and
// keeps the rows in sync from the stream; when the writers stop and the
// slot catches up, every row is in parity and no trigger ever existed.
func TestBackfillAndSyncUnderLoad(t *testing.T) {
	dsn, pool := seed(t, 200000)
	w := startWriters(t, pool, 4, 200000)
	defer w.Stop()
	d := startDaemon(t, writeConfig(t, usersConfig(dsn)))
	waitFor(t, 5*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if n := query[int64](t, pool, `SELECT count(*) FROM pg_trigger WHERE tgrelid = 'users'::regclass`); n != 0 {
		t.Errorf("%d triggers on users", n)
	}
	w.Stop()
	end := query[string](t, pool, `SELECT pg_current_wal_insert_lsn()::text`)
	waitFor(t, time.Minute, "slot caught up", func() bool { return caughtUp(t, pool, end) })
	if n := mismatches(t, pool); n != 0 {
		t.Fatalf("%d rows out of parity after sync\n%s", n, d.output())
	}
	if f := w.Failures(); len(f) != 0 {
		t.Errorf("%d application writes failed; first: %v", len(f), f[0].Err)
	}
	done := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	t.Logf("writer ops %d, rows_done %d", ops(w), done)
	// Abort cleans up everything the daemon made.
	r := cli(t, time.Minute, nil, "abort", "--config", writeConfig(t, usersConfig(dsn)))
	if r.code != 0 {
		t.Fatalf("abort failed\n%s", r)
	}
	if code := d.wait(t, time.Minute); code != 0 {
		t.Errorf("daemon exit %d after abort\n%s", code, d.output())
	}
	if n := query[int64](t, pool, `SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_origin)`); n != 0 {
		t.Errorf("%d slots, publications or origins left after abort", n)
	}
}

// TestKillAndResume: SIGKILL in the middle of the backfill; the restarted
// daemon goes on from the saved cursor, makes no second slot and repeats no
// DDL.
func TestKillAndResume(t *testing.T) {
	dsn, pool := seed(t, 60000)
	cfg := writeConfig(t, usersConfig(dsn)+"backfill:\n  max_rows_per_second: 15000\n  batch_size: 1000\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "backfill under way", func() bool {
		return phase(t, pool) == "backfill" && query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`) >= 10000
	})
	d.kill()
	before := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	if before >= 60000 {
		t.Fatalf("backfill finished before the kill (%d rows)", before)
	}
	d2 := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	after := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	if after-before > 60000-before+2000 {
		t.Errorf("rows_done went from %d to %d: the backfill restarted from zero", before, after)
	}
	if n := query[int64](t, pool, `SELECT count(*) FROM pg_replication_slots`); n != 1 {
		t.Errorf("%d slots, want 1", n)
	}
	if n := query[int64](t, pool, `SELECT count(*) FROM cdcbackfill.events WHERE kind = 'ddl'`); n != 1 {
		t.Errorf("expand DDL ran %d times", n)
	}
	if n := mismatches(t, pool); n != 0 {
		t.Errorf("%d rows out of parity", n)
	}
	d2.kill()
}

// TestServerCrashDuringBackfill: the server is killed in the middle of the
// backfill, with the application writing. The batches commit
// asynchronously, so the crash may lose the last of them, but only with
// their cursor: the daemon comes back on its own, goes on from the cursor
// that survived (not from zero) and every row ends in parity.
func TestServerCrashDuringBackfill(t *testing.T) {
	srv := pgtest.Shared(t)
	if srv.Kind() == "env" {
		t.Skip("a server given by CDCBACKFILL_TEST_DSN cannot be crashed")
	}
	dsn, pool := seed(t, 60000)
	w := startWriters(t, pool, 2, 60000)
	defer w.Stop()
	cfg := writeConfig(t, usersConfig(dsn)+"backfill:\n  max_rows_per_second: 15000\n  batch_size: 1000\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "backfill under way", func() bool {
		return phase(t, pool) == "backfill" && query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`) >= 10000
	})
	if err := srv.Crash(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "server back", func() bool { return pool.Ping(context.Background()) == nil })
	after := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	if after == 0 {
		t.Fatalf("rows_done 0 after the crash: the batches' cursor was lost with all of them")
	}
	if after >= 60000 {
		t.Fatalf("backfill finished before the crash (%d rows)", after)
	}
	waitFor(t, 2*time.Minute, "phase sync after the crash", func() bool { return phase(t, pool) == "sync" })
	select {
	case <-d.Done():
		t.Fatalf("daemon exited (%d) instead of resuming\n%s", d.Code(), d.output())
	default:
	}
	w.Stop()
	end := query[string](t, pool, `SELECT pg_current_wal_insert_lsn()::text`)
	waitFor(t, time.Minute, "slot caught up", func() bool { return caughtUp(t, pool, end) })
	if n := mismatches(t, pool); n != 0 {
		t.Fatalf("%d rows out of parity after the crash\n%s", n, d.output())
	}
}

// TestExpandWaitsBehindLockWithoutBlockingApp: a session holds ACCESS SHARE
// in an open transaction; expand retries under lock_timeout, application
// SELECTs keep answering, and expand completes once the session ends.
func TestExpandWaitsBehindLockWithoutBlockingApp(t *testing.T) {
	dsn, pool := seed(t, 1000)
	holder, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	exec := func(sql string) {
		if _, err := holder.Exec(context.Background(), sql); err != nil {
			t.Fatal(err)
		}
	}
	exec("BEGIN")
	exec("SELECT count(*) FROM users") // ACCESS SHARE until COMMIT
	cfg := writeConfig(t, usersConfig(dsn)+"ddl:\n  lock_timeout: 200ms\n  max_retries: 100\n")
	d := startDaemon(t, cfg)
	waitFor(t, 30*time.Second, "a DDL retry in the log", func() bool { return strings.Contains(d.output(), "DDL waits for a lock") })
	var worst time.Duration
	for i := 0; i < 20; i++ {
		start := time.Now()
		if _, err := pool.Exec(context.Background(), "SELECT * FROM users WHERE id = 1"); err != nil {
			t.Fatal(err)
		}
		worst = max(worst, time.Since(start))
	}
	if worst > 200*time.Millisecond+300*time.Millisecond {
		t.Errorf("an application SELECT waited %s behind the DDL (lock_timeout 200ms)", worst)
	}
	if p := phase(t, pool); p != "expand" {
		t.Fatalf("phase %s while the lock is held", p)
	}
	exec("COMMIT")
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if !strings.Contains(d.output(), "blocked_by") || !strings.Contains(d.output(), "SELECT count(*) FROM users") {
		t.Errorf("the retry log does not name the blocking session\n%s", d.output())
	}
}

// TestExpressionFailsOnARow: the error names the key of the row.
func TestExpressionFailsOnARow(t *testing.T) {
	dsn, pool := seed(t, 3000)
	yaml := strings.Replace(usersConfig(dsn), "split_part(full_name, ' ', 2)", "(100 / (id - 1234))::text", 1)
	cfgPath := writeConfig(t, yaml)
	d := startDaemon(t, cfgPath)
	code := d.wait(t, time.Minute)
	if code == 0 {
		t.Fatalf("daemon exit 0 on a failing expression\n%s", d.output())
	}
	out := d.output()
	for _, want := range []string{"last_name", "(id)=(1234)", "division by zero"} {
		if !strings.Contains(out, want) {
			t.Errorf("error lacks %q\n%s", want, out)
		}
	}
	if e := query[string](t, pool, `SELECT coalesce(error, '') FROM cdcbackfill.migrations`); !strings.Contains(e, "(id)=(1234)") {
		t.Errorf("state row error %q does not name the row", e)
	}
	// status tells from the leader lock that no daemon runs, and shows no
	// stale rate or ETA.
	r := cli(t, 10*time.Second, nil, "status", "--config", cfgPath)
	mustContain(t, r, "no daemon running", "last error:", "(id)=(1234)")
	if strings.Contains(r.stdout, "rows/s") || strings.Contains(r.stdout, "ETA") {
		t.Errorf("status of a stopped daemon shows a rate\n%s", r)
	}
}

// TestRunRefusesBadInputChangingNothing: run checks what plan checks
// before it touches anything.
func TestRunRefusesBadInputChangingNothing(t *testing.T) {
	cases := []struct{ name, setup, after, want string }{
		{"table without a primary key", "CREATE TABLE users (id bigint, full_name text)", "", "has no primary key"},
		{"slot name taken", seedUsers, "SELECT pg_create_logical_replication_slot('cdcbackfill_split_full_name', 'pgoutput')", "already exists and is not this migration's"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dsn := pgtest.NewDatabase(t)
			exec1(t, dsn, c.setup)
			if c.after != "" {
				exec1(t, dsn, c.after)
			}
			d := startDaemon(t, writeConfig(t, usersConfig(dsn)))
			if code := d.wait(t, 30*time.Second); code != 1 {
				t.Fatalf("exit %d, want 1\n%s", code, d.output())
			}
			if !strings.Contains(d.output(), c.want) {
				t.Errorf("output lacks %q\n%s", c.want, d.output())
			}
			if c.after != "" {
				exec1(t, dsn, "SELECT pg_drop_replication_slot('cdcbackfill_split_full_name')")
			}
			assertUnchanged(t, dsn)
		})
	}
}

// heartbeats waits until the daemon has published its status n more times.
func heartbeats(t *testing.T, pool *pgxpool.Pool, n int) {
	t.Helper()
	last := query[string](t, pool, `SELECT coalesce(stats->>'heartbeat_at', '') FROM cdcbackfill.migrations`)
	for i := 0; i < n; i++ {
		waitFor(t, 10*time.Second, "a daemon heartbeat", func() bool {
			now := query[string](t, pool, `SELECT coalesce(stats->>'heartbeat_at', '') FROM cdcbackfill.migrations`)
			if now == last {
				return false
			}
			last = now
			return true
		})
	}
}

// TestPauseResume: pause stops the batches within a second; resume goes on.
func TestPauseResume(t *testing.T) {
	dsn, pool := seed(t, 50000)
	cfg := writeConfig(t, usersConfig(dsn)+"backfill:\n  max_rows_per_second: 10000\n  batch_size: 500\n")
	startDaemon(t, cfg)
	waitFor(t, time.Minute, "backfill under way", func() bool {
		return phase(t, pool) == "backfill" && query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`) > 2000
	})
	if r := cli(t, 10*time.Second, nil, "pause", "--config", cfg); r.code != 0 {
		t.Fatalf("pause\n%s", r)
	}
	// The promise: batches stop within a second, i.e. within two of the
	// daemon's 500 ms ticks (plus the batch in hand). Counted on the
	// daemon's own heartbeats, not on the test's clock.
	heartbeats(t, pool, 2)
	a := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	heartbeats(t, pool, 2)
	b := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	if b != a {
		t.Errorf("rows_done moved from %d to %d while paused", a, b)
	}
	r := cli(t, 10*time.Second, nil, "status", "--config", cfg)
	mustContain(t, r, "PAUSED", "backfill")
	if r := cli(t, 10*time.Second, nil, "resume", "--config", cfg); r.code != 0 {
		t.Fatalf("resume\n%s", r)
	}
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
}

// TestWatchSurvivesItsSessionsEnd: the daemon's sessions other than the
// leader lock's are terminated during sync (its observer, which reads the
// operator's commands and writes the heartbeat, among them). The lock
// lives, so the daemon leads on: its observer must come back, or an
// approve, abort or pause would go unseen for as long as it runs.
func TestWatchSurvivesItsSessionsEnd(t *testing.T) {
	dsn, pool := seed(t, 5000)
	cfg := writeConfig(t, usersConfig(dsn))
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	heartbeats(t, pool, 1)
	n := query[int64](t, pool, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
		  AND application_name = $1 AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)`, dbconn.ApplicationName)
	if n == 0 {
		t.Fatalf("no session of the daemon's to terminate besides the lock's\n%s", d.output())
	}
	heartbeats(t, pool, 2)
	if r := cli(t, 10*time.Second, nil, "pause", "--config", cfg); r.code != 0 {
		t.Fatalf("pause\n%s", r)
	}
	waitFor(t, 10*time.Second, "the daemon to report the pause", func() bool {
		return query[string](t, pool, `SELECT coalesce(stats->>'throttle_reason', '') FROM cdcbackfill.migrations`) != ""
	})
	select {
	case <-d.Done():
		t.Fatalf("daemon exited (%d)\n%s", d.Code(), d.output())
	default:
	}
}

// TestSyncSurvivesFaults: during sync, with the application writing, the
// daemon is killed and restarted, its replication connection terminated,
// and the server restarted; after each it resumes, nothing the writers did
// is lost, and the slot's confirmed position advances.
func TestSyncSurvivesFaults(t *testing.T) {
	dsn, pool := seed(t, 20000)
	w := startWriters(t, pool, 3, 20000)
	defer w.Stop()
	cfg := writeConfig(t, usersConfig(dsn))
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	confirmed := func() string {
		var s string
		_ = pool.QueryRow(context.Background(), `SELECT confirmed_flush_lsn::text FROM pg_replication_slots`).Scan(&s)
		return s
	}
	advances := func(what string) {
		now := query[string](t, pool, `SELECT pg_current_wal_insert_lsn()::text`)
		waitFor(t, time.Minute, "slot confirmed past "+now+" after "+what, func() bool {
			var ok bool
			_ = pool.QueryRow(context.Background(), `SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots`, now).Scan(&ok)
			return ok
		})
	}

	d.kill()
	d = startDaemon(t, cfg)
	advances("SIGKILL and restart")

	before := confirmed()
	query[bool](t, pool, `SELECT bool_and(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE active_pid IS NOT NULL`)
	advances("pg_terminate_backend of the walsender (was " + before + ")")

	if srv := pgtest.Shared(t); srv.Kind() != "env" {
		if err := srv.Restart(context.Background()); err != nil {
			t.Fatal(err)
		}
		waitFor(t, time.Minute, "server back", func() bool { return pool.Ping(context.Background()) == nil })
		advances("server restart")
	}

	w.Stop()
	end := query[string](t, pool, `SELECT pg_current_wal_insert_lsn()::text`)
	waitFor(t, time.Minute, "slot caught up", func() bool { return caughtUp(t, pool, end) })
	if n := mismatches(t, pool); n != 0 {
		t.Fatalf("%d rows out of parity after faults\n%s", n, d.output())
	}
	select {
	case <-d.Done():
		t.Fatalf("daemon exited (%d) instead of resuming\n%s", d.Code(), d.output())
	default:
	}
	// Caught up and idle: the slot holds back almost nothing.
	held := query[int64](t, pool, `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots`)
	if held > 16<<20 {
		t.Errorf("slot holds back %d bytes of WAL after catching up", held)
	}
}

// TestBackfillPassesOverHeldRows: rows the application holds (locked, not
// changed, so the stream will never bring them) are passed over without
// waiting, kept, and backfilled once released.
func TestBackfillPassesOverHeldRows(t *testing.T) {
	dsn, pool := seed(t, 20000)
	d := startDaemon(t, writeConfig(t, usersConfig(dsn)+"backfill:\n  max_rows_per_second: 4000\n  batch_size: 500\n  target_batch_time: 0s\n"))
	defer func() {
		if t.Failed() {
			t.Log(d.output())
		}
	}()
	// Lock ahead of the cursor once the slot exists (slot creation waits
	// for transactions that hold row locks).
	waitFor(t, time.Minute, "backfill under way", func() bool {
		return phase(t, pool) == "backfill" && query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`) > 0
	})
	holder, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	for _, sql := range []string{"BEGIN", "SELECT * FROM users WHERE id IN (15000, 19000) FOR UPDATE"} {
		if _, err := holder.Exec(context.Background(), sql); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, time.Minute, "the held rows kept to retry", func() bool {
		var n int64
		_ = pool.QueryRow(context.Background(), `SELECT count(*) FROM cdcbackfill.retry_keys`).Scan(&n)
		return n == 2
	})
	waitFor(t, time.Minute, "the cursor past the held rows", func() bool {
		return query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`) >= 20000
	})
	if p := phase(t, pool); p != "backfill" {
		t.Fatalf("phase %s while rows are held", p)
	}
	if n := mismatches(t, pool); n != 2 {
		t.Errorf("%d rows out of parity while two are held, want 2", n)
	}
	if _, err := holder.Exec(context.Background(), "COMMIT"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if n := mismatches(t, pool); n != 0 {
		t.Errorf("%d rows out of parity after the held rows were released", n)
	}
}

// TestSlotLostSaysSoAndRecovers: while the daemon is gone the server
// invalidates its slot (max_slot_wal_keep_size); the restarted daemon says
// so and how to recover, never going on silently; `recover` and `run`
// bring the table back to parity with a new slot.
func TestSlotLostSaysSoAndRecovers(t *testing.T) {
	srv := pgtest.Shared(t)
	if srv.Kind() == "env" {
		t.Skip("changes a server setting")
	}
	dsn, pool := seed(t, 20000)
	cfg := writeConfig(t, usersConfig(dsn))
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	d.kill()

	exec1(t, srv.DSN(), "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'", "SELECT pg_reload_conf()")
	defer exec1(t, srv.DSN(), "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")
	waitFor(t, time.Minute, "the slot to be lost", func() bool {
		exec1(t, dsn, "UPDATE users SET full_name = 'lost ' || id WHERE id % 10 = 0", "SELECT pg_switch_wal()", "CHECKPOINT")
		return query[string](t, pool, `SELECT wal_status FROM pg_replication_slots`) == "lost"
	})
	r := cli(t, 10*time.Second, nil, "status", "--json", "--config", cfg)
	mustContain(t, r, `"slot_wal_status":"lost"`)

	d = startDaemon(t, cfg)
	if code := d.wait(t, time.Minute); code == 0 {
		t.Fatalf("the daemon went on with a lost slot\n%s", d.output())
	}
	for _, want := range []string{"invalidated", "cdcbackfill recover --config"} {
		if !strings.Contains(d.output(), want) {
			t.Errorf("output lacks %q\n%s", want, d.output())
		}
	}
	r = cli(t, 30*time.Second, nil, "recover", "--config", cfg)
	if r.code != 0 {
		t.Fatalf("recover\n%s", r)
	}
	exec1(t, srv.DSN(), "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")
	startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync again", func() bool { return phase(t, pool) == "sync" })
	end := query[string](t, pool, `SELECT pg_current_wal_insert_lsn()::text`)
	waitFor(t, time.Minute, "slot caught up", func() bool { return caughtUp(t, pool, end) })
	if n := mismatches(t, pool); n != 0 {
		t.Errorf("%d rows out of parity after recover", n)
	}
	if n := query[int64](t, pool, `SELECT count(*) FROM cdcbackfill.events WHERE kind = 'ddl'`); n != 1 {
		t.Errorf("expand DDL ran %d times", n)
	}
}

// TestSIGTERMStopsCleanly: SIGTERM in the backfill and in sync ends the
// daemon with exit 0, its state saved; run again resumes.
func TestSIGTERMStopsCleanly(t *testing.T) {
	dsn, pool := seed(t, 40000)
	cfg := writeConfig(t, usersConfig(dsn)+"backfill:\n  max_rows_per_second: 10000\n  batch_size: 1000\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "backfill under way", func() bool {
		return phase(t, pool) == "backfill" && query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`) > 2000
	})
	if err := d.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := d.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM in backfill\n%s", code, d.output())
	}
	saved := query[int64](t, pool, `SELECT rows_done FROM cdcbackfill.migrations`)
	if saved == 0 || saved >= 40000 {
		t.Errorf("rows_done %d after SIGTERM mid-backfill", saved)
	}
	// The server ends the walsender once it sees the connection close,
	// a moment after the process exits.
	waitFor(t, 10*time.Second, "the slot released after exit", func() bool {
		return query[int64](t, pool, `SELECT count(*) FROM pg_replication_slots WHERE active`) == 0
	})

	d = startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	exec1(t, dsn, "UPDATE users SET full_name = 'term ' || id WHERE id % 100 = 0")
	end := query[string](t, pool, `SELECT pg_current_wal_insert_lsn()::text`)
	waitFor(t, time.Minute, "the change applied", func() bool { return mismatches(t, pool) == 0 })
	if err := d.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := d.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM in sync\n%s", code, d.output())
	}
	// The final standby status confirmed what was applied.
	waitFor(t, 10*time.Second, "the slot confirmed past the applied change", func() bool { return caughtUp(t, pool, end) })
}
