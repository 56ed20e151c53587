package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/internal/workload"
)

// startApp starts the application of internal/workload as these tests
// run it: a steady load that writes full_name only (until Deploy),
// recording what each row must hold in the table expected.
func startApp(t *testing.T, pool *pgxpool.Pool, n int, maxID int64) *workload.App {
	a := workload.Start(pool, workload.Options{Writers: n, Pause: 3 * time.Millisecond, MaxID: maxID, Seed: 100,
		Mix: workload.Mix{SignUps: 2, Renames: 7, Deletes: 1}, Expected: "expected"})
	t.Cleanup(a.Stop)
	return a
}

// seedExpected creates the table expected (see workload.CreateExpected).
func seedExpected(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	if err := workload.CreateExpected(context.Background(), pool, "expected"); err != nil {
		t.Fatal(err)
	}
}

// differFromExpected counts rows whose new columns differ from what the
// application last wrote (or rows present on one side only).
func differFromExpected(t *testing.T, pool *pgxpool.Pool) int64 {
	t.Helper()
	n, _, err := workload.DifferFromExpected(context.Background(), pool, "expected")
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// ops is how many transactions the application ran.
func ops(a *workload.App) int64 {
	n, _ := a.Transactions()
	return n
}

func nothingLeft(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	n := query[int64](t, pool, `SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_origin)`)
	if n != 0 {
		t.Errorf("%d slots, publications or origins left behind", n)
	}
}

func hasColumn(t *testing.T, pool *pgxpool.Pool, col string) bool {
	return query[bool](t, pool, `SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'users' AND column_name = $1)`, col)
}

func autoConfig(dsn string) string {
	return usersConfig(dsn) + `dual_write:
  detect: auto
  quiet_period: 2s
  min_evidence: 200
contract_policy:
  mode: auto
  hold: 2s
`
}

// finishesAsWritten waits for the daemon to exit 0 (at done) and the
// application to switch to the new columns, stops the application, and
// checks that every row holds what it last wrote and nothing is left behind.
func finishesAsWritten(t *testing.T, d *daemon, a *workload.App, pool *pgxpool.Pool, timeout time.Duration) {
	t.Helper()
	if code := d.wait(t, timeout); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	waitFor(t, time.Minute, "the app to switch to the new columns", func() bool { return a.Release() == workload.WritesNew })
	a.Stop()
	if n := differFromExpected(t, pool); n != 0 {
		t.Errorf("%d rows differ from what the application last wrote", n)
	}
	nothingLeft(t, pool)
}

// TestFullStory: writers write only full_name, then dual-write; with
// detect auto and contract auto the daemon reaches done by itself, drops
// full_name, and every row holds what the writers last wrote.
func TestFullStory(t *testing.T) {
	_, pool := seed(t, 200000)
	dsn := pool.Config().ConnString()
	seedExpected(t, pool)
	a := startApp(t, pool, 3, 200000)
	defer a.Stop()
	d := startDaemon(t, writeConfig(t, autoConfig(dsn)))
	waitFor(t, 5*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.Deploy(workload.WritesBoth)
	if code := d.wait(t, 5*time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	if p := phase(t, pool); p != "done" {
		t.Fatalf("phase %s after exit 0", p)
	}
	waitFor(t, time.Minute, "the app to switch to the new columns", func() bool { return a.Release() == workload.WritesNew })
	a.Stop()
	if hasColumn(t, pool, "full_name") {
		t.Error("full_name still exists after done")
	}
	if n := differFromExpected(t, pool); n != 0 {
		t.Errorf("%d rows differ from what the writers last wrote", n)
	}
	if f := a.Failures(); len(f) != 0 {
		t.Errorf("%d application transactions failed; first: %v", len(f), f[0].Err)
	}
	nothingLeft(t, pool)
	t.Logf("application transactions: %d", ops(a))
}

// TestManualWaitsForApprove: detect manual and contract manual wait for
// approve at each point, and not before.
func TestManualWaitsForApprove(t *testing.T) {
	dsn, pool := seed(t, 20000)
	seedExpected(t, pool)
	a := startApp(t, pool, 2, 20000)
	defer a.Stop()
	cfg := writeConfig(t, usersConfig(dsn)+"contract_policy:\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.Deploy(workload.WritesBoth)
	// It waits in sync while the stream keeps working.
	events := query[int64](t, pool, `SELECT sync_events FROM cdcbackfill.migrations`)
	waitFor(t, time.Minute, "the stream to see application changes", func() bool {
		return query[int64](t, pool, `SELECT sync_events FROM cdcbackfill.migrations`) > events+200
	})
	if p := phase(t, pool); p != "sync" {
		t.Fatalf("left sync without approve: %s", p)
	}
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	waitFor(t, 2*time.Minute, "phase contract", func() bool { return phase(t, pool) == "contract" })
	checked := query[int64](t, pool, `SELECT verify_rows_checked FROM cdcbackfill.migrations`)
	if checked < 20000 {
		t.Errorf("reached contract after checking %d rows", checked)
	}
	events = query[int64](t, pool, `SELECT sync_events FROM cdcbackfill.migrations`)
	waitFor(t, time.Minute, "more application changes", func() bool {
		return query[int64](t, pool, `SELECT sync_events FROM cdcbackfill.migrations`) > events+100
	})
	if !hasColumn(t, pool, "full_name") {
		t.Fatal("contract DDL ran without approve")
	}
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	if code := d.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	a.Stop()
	if hasColumn(t, pool, "full_name") {
		t.Error("full_name still exists after done")
	}
	if n := differFromExpected(t, pool); n != 0 {
		t.Errorf("%d rows differ from what the writers last wrote", n)
	}
	nothingLeft(t, pool)
}

// TestWrongDualWriteKeepsOutOfContract: an application that dual-writes
// values disagreeing with the expression keeps the migration in verify;
// its values are never overwritten, and status shows the rows with both
// values. Once the application writes them right (and fixes the rows it
// wrote wrong), the migration finishes by itself and every row holds what
// the application last wrote.
func TestWrongDualWriteKeepsOutOfContract(t *testing.T) {
	dsn, pool := seed(t, 20000)
	seedExpected(t, pool)
	a := startApp(t, pool, 2, 20000)
	defer a.Stop()
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: auto\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.SetWrong(true)
	a.Deploy(workload.WritesBoth)
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	waitFor(t, 2*time.Minute, "rows out of parity in verify, after a whole pass", func() bool {
		s := status(t, cfg)
		return s.Phase == "verify" && s.Verify.PassDone && s.Verify.Mismatches > 0 && phaseLasted(t, pool, 3*time.Second)
	})
	if p := phase(t, pool); p != "verify" {
		t.Fatalf("phase %s: wrong dual-writes must keep the migration out of contract", p)
	}
	s := status(t, cfg)
	if len(s.Verify.MismatchSamples) == 0 || s.Verify.MismatchSamples[0].Columns["first_name"].Actual == nil ||
		*s.Verify.MismatchSamples[0].Columns["first_name"].Actual != "WRONG" {
		t.Errorf("mismatch samples %+v: want first_name WRONG with the expression's value", s.Verify.MismatchSamples)
	}
	r := cli(t, 10*time.Second, nil, "status", "--config", cfg)
	mustContain(t, r, "out of parity now", `first_name="WRONG" (expression`)
	if n := query[int64](t, pool, `SELECT count(*) FROM users WHERE first_name = 'WRONG'`); n == 0 {
		t.Fatal("the application's values were overwritten")
	}
	// The application's fix: it writes right from now on, and repairs the
	// rows it wrote wrong.
	a.SetWrong(false)
	waitFor(t, time.Minute, "no row written wrong left", func() bool {
		exec1(t, dsn, `UPDATE users SET first_name = split_part(full_name, ' ', 1) WHERE first_name = 'WRONG'`)
		return query[int64](t, pool, `SELECT count(*) FROM users WHERE first_name = 'WRONG'`) == 0
	})
	finishesAsWritten(t, d, a, pool, 2*time.Minute)
}

// TestAbortRollback: abort --rollback during backfill and during sync
// leaves the table as before expand and nothing behind.
func TestAbortRollback(t *testing.T) {
	for _, when := range []string{"backfill", "sync"} {
		t.Run(when, func(t *testing.T) {
			dsn, pool := seed(t, 30000)
			extra := ""
			if when == "backfill" {
				extra = "backfill:\n  max_rows_per_second: 5000\n  batch_size: 500\n"
			}
			cfg := writeConfig(t, usersConfig(dsn)+"rollback:\n  - ALTER TABLE users DROP COLUMN first_name, DROP COLUMN last_name\n"+extra)
			w := startWriters(t, pool, 2, 30000)
			defer w.Stop()
			d := startDaemon(t, cfg)
			waitFor(t, 2*time.Minute, "phase "+when, func() bool { return phase(t, pool) == when })
			r := cli(t, time.Minute, nil, "abort", "--rollback", "--config", cfg)
			if r.code != 0 {
				t.Fatalf("abort\n%s", r)
			}
			if code := d.wait(t, time.Minute); code != 0 {
				t.Errorf("daemon exit %d after abort\n%s", code, d.output())
			}
			w.Stop()
			if p := phase(t, pool); p != "aborted" {
				t.Errorf("phase %s", p)
			}
			if hasColumn(t, pool, "first_name") || hasColumn(t, pool, "last_name") {
				t.Error("rollback left the new columns")
			}
			nothingLeft(t, pool)
			if f := w.Failures(); len(f) != 0 {
				t.Errorf("%d application writes failed; first: %v", len(f), f[0].Err)
			}
		})
	}
}

// TestKillDuringVerifyAndContract: SIGKILL in verify, then in contract
// before the DDL; the restarted daemon finishes correctly.
func TestKillDuringVerifyAndContract(t *testing.T) {
	dsn, pool := seed(t, 30000)
	seedExpected(t, pool)
	a := startApp(t, pool, 2, 30000)
	defer a.Stop()
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: manual\n  hold: 1s\nbackfill:\n  batch_size: 2000\n  target_batch_time: 0s\n")
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.Deploy(workload.WritesBoth)
	cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	waitFor(t, time.Minute, "verify under way", func() bool {
		return query[int64](t, pool, `SELECT coalesce((SELECT verify_rows_checked FROM cdcbackfill.migrations WHERE phase = 'verify'), 0)`) > 0
	})
	d.kill()
	d = startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase contract", func() bool { return phase(t, pool) == "contract" })
	d.kill()
	d = startDaemon(t, cfg)
	cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	if code := d.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	waitFor(t, time.Minute, "the app to switch to the new columns", func() bool { return a.Release() == workload.WritesNew })
	a.Stop()
	if n := differFromExpected(t, pool); n != 0 {
		t.Errorf("%d rows differ from what the writers last wrote", n)
	}
	if n := query[int64](t, pool, `SELECT count(*) FROM cdcbackfill.events WHERE kind = 'cutover'`); n != 1 {
		t.Errorf("contract cut-over committed %d times", n)
	}
	nothingLeft(t, pool)
}

// TestContractNeverDropsNothing: contract_policy never keeps the migration
// in verify once parity holds, and drops nothing.
func TestContractNeverDropsNothing(t *testing.T) {
	dsn, pool := seed(t, 10000)
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: never\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	waitFor(t, time.Minute, "the daemon to say it stays", func() bool {
		return strings.Contains(d.output(), "contract_policy.mode is never")
	})
	if p := phase(t, pool); p != "verify" {
		t.Errorf("phase %s, want verify", p)
	}
	if !hasColumn(t, pool, "full_name") {
		t.Error("full_name dropped with contract_policy never")
	}
	if n := query[int64](t, pool, `SELECT count(*) FROM pg_replication_slots`); n != 1 {
		t.Errorf("%d slots: the stream must go on", n)
	}
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code == 0 {
		t.Errorf("approve in verify should be refused\n%s", r)
	}
}

// TestCrashAfterContractDDL: the daemon dies right after the contract DDL
// committed (the DDL and its record commit together, so the state says
// contract_done = 1); the restarted daemon runs no DDL again and finishes.
func TestCrashAfterContractDDL(t *testing.T) {
	dsn, pool := seed(t, 10000)
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: manual\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	waitFor(t, time.Minute, "phase contract", func() bool { return phase(t, pool) == "contract" })
	d.kill()
	// What the daemon's contract step commits, done by hand: the crash point.
	exec1(t, dsn, "BEGIN; ALTER TABLE users DROP COLUMN full_name; UPDATE cdcbackfill.migrations SET contract_done = 1; COMMIT")
	d = startDaemon(t, cfg)
	if code := d.wait(t, time.Minute); code != 0 {
		t.Fatalf("exit %d\n%s", code, d.output())
	}
	if p := phase(t, pool); p != "done" {
		t.Errorf("phase %s", p)
	}
	if strings.Contains(d.output(), "contract: running DDL") {
		t.Errorf("the contract DDL ran again\n%s", d.output())
	}
	nothingLeft(t, pool)
	if r := cli(t, 10*time.Second, nil, "abort", "--config", cfg); r.code == 0 || !strings.Contains(r.stderr, "too late: the contract DDL") {
		t.Errorf("abort after done should be refused with a reason\n%s", r)
	}
}
