package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/internal/workload"
)

// withNewColumnsFirstClass is the running example where first_name is to
// be NOT NULL and last_name indexed, written as a user writes them.
func withNewColumnsFirstClass(yaml string) string {
	yaml = strings.Replace(yaml, "expand:\n", "expand:\n  - CREATE INDEX users_last ON users (last_name)\n", 1)
	return strings.Replace(yaml, "contract:\n", "contract:\n  - ALTER TABLE users ALTER COLUMN first_name SET NOT NULL\n", 1)
}

// runStory runs the full story (writers on full_name, then dual-writing)
// to done and returns how long the committing cut-over held the table's
// lock: the stall it caused (a try that found the lock taken stalls no
// more than contract_policy.lock_timeout, whatever the DDL).
func runStory(t *testing.T, rows int, config func(dsn string) string) (*pgxpool.Pool, float64, string) {
	_, pool := seed(t, rows)
	dsn := pool.Config().ConnString()
	seedExpected(t, pool)
	a := startApp(t, pool, 3, int64(rows))
	defer a.Stop()
	cfg := writeConfig(t, config(dsn))
	d := startDaemon(t, cfg)
	waitFor(t, 5*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.Deploy(workload.WritesBoth)
	finishesAsWritten(t, d, a, pool, 5*time.Minute)
	if f := a.Failures(); len(f) != 0 {
		t.Errorf("%d application transactions failed; first: %v", len(f), f[0].Err)
	}
	s := status(t, cfg)
	if s.Contract.Cutover == nil {
		t.Fatal("no cut-over reported")
	}
	for _, l := range strings.Split(d.output(), "\n") {
		if strings.Contains(l, "cut-over committed") {
			t.Log(l)
		}
	}
	return pool, s.Contract.Cutover.HeldMS, d.output()
}

// TestNewColumnsBecomeFirstClass: the user asks for first_name NOT NULL
// (in contract) and an index on last_name (in expand). Under the writers of
// the full story the migration reaches done with first_name NOT NULL, the
// index valid, and nothing of the daemon's left; the index was built after
// the backfill, and the cut-over, which only attaches what was validated
// before, stalls the application no more than the plain one.
func TestNewColumnsBecomeFirstClass(t *testing.T) {
	var plain, firstClass float64
	t.Run("plain", func(t *testing.T) {
		_, plain, _ = runStory(t, 30000, autoConfig)
	})
	t.Run("first_class", func(t *testing.T) {
		pool, stall, log := runStory(t, 30000, func(dsn string) string { return withNewColumnsFirstClass(autoConfig(dsn)) })
		if !query[bool](t, pool, `SELECT attnotnull FROM pg_attribute WHERE attrelid = 'users'::regclass AND attname = 'first_name'`) {
			t.Error("first_name is not NOT NULL at done")
		}
		if !query[bool](t, pool, `SELECT coalesce((SELECT indisvalid FROM pg_index WHERE indexrelid = 'users_last'::regclass), false)`) {
			t.Error("users_last is missing or INVALID at done")
		}
		if n := query[int64](t, pool, `SELECT count(*) FROM pg_constraint WHERE conrelid = 'users'::regclass AND contype = 'c'`); n != 0 {
			t.Errorf("%d check constraints left behind", n)
		}
		firstClass = stall
		// In order: the index once verify starts (after the backfill), the
		// check validated before the cut-over, which only attaches it.
		order := []string{"backfill: done", "verify: index on new columns valid", "contract: constraint validated", "cut-over committed"}
		at := -1
		for _, w := range order {
			i := strings.Index(log, w)
			if i < 0 || i < at {
				t.Errorf("%q is not after %q in the log", w, order)
			}
			at = i
		}
	})
	t.Logf("the cut-over held the lock %.1f ms plain, %.1f ms with NOT NULL and an index", plain, firstClass)
	if plain > 0 && firstClass > 2*plain+30 {
		t.Errorf("the cut-over with NOT NULL held the lock %.1f ms, more than twice the plain one's %.1f ms (+30 ms of noise)", firstClass, plain)
	}
}

// TestNotNullViolationHoldsVerify: the application dual-writes a NULL
// first_name, which the migration is to make NOT NULL. Nothing fails, for
// the application or the daemon: verify finds the row, names its key in
// status, and holds; once the application fixes it the migration ends
// with first_name NOT NULL.
func TestNotNullViolationHoldsVerify(t *testing.T) {
	dsn, pool := seed(t, 3000)
	cfg := writeConfig(t, withNewColumnsFirstClass(usersConfig(dsn))+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: auto\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	exec1(t, dsn, `UPDATE users SET full_name = 'Cher', first_name = NULL, last_name = NULL WHERE id = 7`)
	waitFor(t, time.Minute, "status to name the row", func() bool {
		s := status(t, cfg)
		return s.Verify.Mismatches > 0 && len(s.Verify.MismatchSamples) > 0 && s.Verify.MismatchSamples[0].Key == "(id)=(7)"
	})
	waitFor(t, time.Minute, "verify to hold on it", func() bool {
		return strings.Contains(status(t, cfg).Waiting, "rows out of parity") && phaseLasted(t, pool, 2*time.Second)
	})
	if p := phase(t, pool); p != "verify" {
		t.Fatalf("phase %s with a NULL first_name outstanding, want verify", p)
	}
	if !strings.Contains(d.output(), "must not be NULL") {
		t.Errorf("the log does not say why the row is out of parity\n%s", d.output())
	}
	exec1(t, dsn, `UPDATE users SET first_name = 'Cher', last_name = '' WHERE id = 7`)
	if code := d.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	if !query[bool](t, pool, `SELECT attnotnull FROM pg_attribute WHERE attrelid = 'users'::regclass AND attname = 'first_name'`) {
		t.Error("first_name is not NOT NULL at done")
	}
}

// notNullStandIn counts the constraint the daemon adds NOT VALID for
// first_name NOT NULL: a check before 18, the NOT NULL itself on 18.
const notNullStandIn = `SELECT count(*) FROM pg_constraint WHERE conrelid = 'users'::regclass
	AND conname IN ('cdcbackfill_not_null_first_name', 'users_first_name_not_null')`

// TestAbortUndoesWhatWasBuilt: abort once the index on last_name and the
// NOT VALID check for first_name exist drops both: a check left behind
// would fail the old release's inserts.
func TestAbortUndoesWhatWasBuilt(t *testing.T) {
	dsn, pool := seed(t, 3000)
	cfg := writeConfig(t, withNewColumnsFirstClass(usersConfig(dsn))+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: manual\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	waitFor(t, time.Minute, "the index and the check", func() bool {
		return query[int64](t, pool, `SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'users_last' AND i.indisvalid`) == 1 &&
			query[int64](t, pool, notNullStandIn+` AND convalidated`) == 1
	})
	if r := cli(t, time.Minute, nil, "abort", "--config", cfg); r.code != 0 {
		t.Fatalf("abort\n%s", r)
	}
	if code := d.wait(t, time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	if n := query[int64](t, pool, `SELECT count(*) FROM pg_class WHERE relname = 'users_last'`); n != 0 {
		t.Error("the index users_last is left after abort")
	}
	if n := query[int64](t, pool, notNullStandIn); n != 0 {
		t.Error("the constraint for first_name NOT NULL is left after abort")
	}
	if query[bool](t, pool, `SELECT attnotnull FROM pg_attribute WHERE attrelid = 'users'::regclass AND attname = 'first_name'`) {
		t.Error("first_name is NOT NULL after abort")
	}
	// The old release inserts rows without the new columns, as before.
	exec1(t, dsn, `INSERT INTO users (id, full_name) VALUES (100000, 'Old Release')`)
	nothingLeft(t, pool)
}

// TestExpandIndexEndsValid: expand builds an index CONCURRENTLY while a
// reporting session holds an older snapshot (on another table) past
// ddl.concurrent_timeout. The try that times out leaves an INVALID index,
// which IF NOT EXISTS would skip; the daemon drops it, builds it again once
// the snapshot is gone, and records the statement done only then.
func TestExpandIndexEndsValid(t *testing.T) {
	dsn, pool := seed(t, 2000)
	exec1(t, dsn, `CREATE TABLE report (x int)`)
	yaml := strings.Replace(usersConfig(dsn), "expand:\n", "expand:\n  - CREATE INDEX CONCURRENTLY IF NOT EXISTS users_email ON users (email)\n", 1) +
		"ddl:\n  concurrent_timeout: 300ms\n"
	reporter, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer reporter.Close(context.Background())
	for _, sql := range []string{`BEGIN ISOLATION LEVEL REPEATABLE READ`, `SELECT count(*) FROM report`} {
		if _, err := reporter.Exec(context.Background(), sql); err != nil {
			t.Fatal(err)
		}
	}
	d := startDaemon(t, writeConfig(t, yaml))
	waitFor(t, time.Minute, "a retry over the INVALID leftover", func() bool {
		return strings.Contains(d.output(), "dropping the INVALID index")
	})
	if p := phase(t, pool); p != "expand" {
		t.Fatalf("phase %s while the index is not built, want expand", p)
	}
	if _, err := reporter.Exec(context.Background(), `COMMIT`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if !query[bool](t, pool, `SELECT indisvalid FROM pg_index WHERE indexrelid = 'users_email'::regclass`) {
		t.Fatal("users_email is INVALID, and expand went on")
	}
}
