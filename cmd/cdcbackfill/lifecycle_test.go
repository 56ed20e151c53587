package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// app is an application that first writes only full_name, then dual-writes
// (computing the new columns itself, with split or with a wrong rule), and
// once full_name is dropped writes only the new columns. It records what it
// last wrote for each row in a table of its own, in the same transaction.
type app struct {
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	mode      atomic.Int32 // 0 full_name only, 1 dual-write, 2 new columns only
	wrong     atomic.Bool  // dual-write values that disagree with the expression
	ops, errs atomic.Int64
	firstErr  atomic.Value
}

const (
	writeOld = iota
	writeBoth
	writeNew
)

func seedExpected(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	for _, sql := range []string{
		`CREATE TABLE expected (id bigint PRIMARY KEY, first text, last text)`,
		`INSERT INTO expected SELECT id, split_part(full_name, ' ', 1), split_part(full_name, ' ', 2) FROM users`,
	} {
		if _, err := pool.Exec(context.Background(), sql); err != nil {
			t.Fatal(err)
		}
	}
}

func startApp(t *testing.T, pool *pgxpool.Pool, n int, maxID int64) *app {
	ctx, cancel := context.WithCancel(context.Background())
	a := &app{cancel: cancel}
	var next atomic.Int64
	next.Store(maxID)
	for i := 0; i < n; i++ {
		a.wg.Add(1)
		go func(seed uint64) {
			defer a.wg.Done()
			r := rand.New(rand.NewPCG(seed, 11))
			for ctx.Err() == nil {
				mode := a.mode.Load()
				err := a.write(ctx, pool, r, &next, mode)
				var pgErr *pgconn.PgError
				if err != nil && errors.As(err, &pgErr) && pgErr.Code == "42703" && mode != writeNew {
					a.mode.Store(writeNew) // full_name is gone: the app's next release
					continue
				}
				if err != nil && ctx.Err() == nil {
					if a.errs.Add(1) == 1 {
						a.firstErr.Store(err.Error())
					}
				}
				a.ops.Add(1)
				time.Sleep(3 * time.Millisecond)
			}
		}(uint64(i) + 100)
	}
	return a
}

func (a *app) write(ctx context.Context, pool *pgxpool.Pool, r *rand.Rand, next *atomic.Int64, mode int32) error {
	op := r.IntN(10)
	id := r.Int64N(next.Load()) + 1
	first, last := fmt.Sprintf("f%d", r.IntN(100000)), fmt.Sprintf("l%d", r.IntN(100000))
	wantFirst, wantLast := first, last
	if mode == writeBoth && a.wrong.Load() {
		wantFirst = "WRONG" // the app's rule disagrees with the expression
	}
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var err error
		switch {
		case op < 2: // insert
			id = next.Add(1)
			switch mode {
			case writeOld:
				_, err = tx.Exec(ctx, `INSERT INTO users (id, full_name, email) VALUES ($1, $2, 'n')`, id, first+" "+last)
			case writeBoth:
				_, err = tx.Exec(ctx, `INSERT INTO users (id, full_name, email, first_name, last_name) VALUES ($1, $2, 'n', $3, $4)`, id, first+" "+last, wantFirst, wantLast)
			default:
				_, err = tx.Exec(ctx, `INSERT INTO users (id, email, first_name, last_name) VALUES ($1, 'n', $2, $3)`, id, wantFirst, wantLast)
			}
		case op < 9: // update the name
			switch mode {
			case writeOld:
				_, err = tx.Exec(ctx, `UPDATE users SET full_name = $2 WHERE id = $1`, id, first+" "+last)
			case writeBoth:
				_, err = tx.Exec(ctx, `UPDATE users SET full_name = $2, first_name = $3, last_name = $4 WHERE id = $1`, id, first+" "+last, wantFirst, wantLast)
			default:
				_, err = tx.Exec(ctx, `UPDATE users SET first_name = $2, last_name = $3 WHERE id = $1`, id, wantFirst, wantLast)
			}
		default: // delete
			if _, err = tx.Exec(ctx, `DELETE FROM users WHERE id = $1`, id); err == nil {
				_, err = tx.Exec(ctx, `DELETE FROM expected WHERE id = $1`, id)
			}
			return err
		}
		if err != nil {
			return err
		}
		// Expected: what the row's new columns must hold now. A row the
		// update did not find stays absent.
		_, err = tx.Exec(ctx, `INSERT INTO expected (id, first, last) SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)
			ON CONFLICT (id) DO UPDATE SET first = EXCLUDED.first, last = EXCLUDED.last`, id, first, last)
		return err
	})
}

func (a *app) stop() {
	a.cancel()
	a.wg.Wait()
}

// differFromExpected counts rows whose new columns differ from what the
// application last wrote (or rows present on one side only).
func differFromExpected(t *testing.T, pool *pgxpool.Pool) int64 {
	return query[int64](t, pool, `SELECT count(*) FROM users u FULL JOIN expected e USING (id)
		WHERE u.id IS NULL OR e.id IS NULL OR u.first_name IS DISTINCT FROM e.first OR u.last_name IS DISTINCT FROM e.last`)
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

// TestFullStory: writers write only full_name, then dual-write; with
// detect auto and contract auto the daemon reaches done by itself, drops
// full_name, and every row holds what the writers last wrote.
func TestFullStory(t *testing.T) {
	_, pool := seed(t, 200000)
	dsn := pool.Config().ConnString()
	seedExpected(t, pool)
	a := startApp(t, pool, 3, 200000)
	defer a.stop()
	d := startDaemon(t, writeConfig(t, autoConfig(dsn)))
	waitFor(t, 5*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.mode.Store(writeBoth)
	if code := d.wait(t, 5*time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	if p := phase(t, pool); p != "done" {
		t.Fatalf("phase %s after exit 0", p)
	}
	waitFor(t, time.Minute, "the app to switch to the new columns", func() bool { return a.mode.Load() == writeNew })
	a.stop()
	if hasColumn(t, pool, "full_name") {
		t.Error("full_name still exists after done")
	}
	if n := differFromExpected(t, pool); n != 0 {
		t.Errorf("%d rows differ from what the writers last wrote", n)
	}
	if n := a.errs.Load(); n != 0 {
		t.Errorf("%d application transactions failed; first: %v", n, a.firstErr.Load())
	}
	nothingLeft(t, pool)
	t.Logf("application transactions: %d", a.ops.Load())
}

// TestManualWaitsForApprove: detect manual and contract manual wait for
// approve at each point, and not before.
func TestManualWaitsForApprove(t *testing.T) {
	dsn, pool := seed(t, 20000)
	seedExpected(t, pool)
	a := startApp(t, pool, 2, 20000)
	defer a.stop()
	cfg := writeConfig(t, usersConfig(dsn)+"contract_policy:\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.mode.Store(writeBoth)
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
	a.stop()
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
	defer a.stop()
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: auto\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.wrong.Store(true)
	a.mode.Store(writeBoth)
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
	a.wrong.Store(false)
	waitFor(t, time.Minute, "no row written wrong left", func() bool {
		exec1(t, dsn, `UPDATE users SET first_name = split_part(full_name, ' ', 1) WHERE first_name = 'WRONG'`)
		return query[int64](t, pool, `SELECT count(*) FROM users WHERE first_name = 'WRONG'`) == 0
	})
	if code := d.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	waitFor(t, time.Minute, "the app to switch to the new columns", func() bool { return a.mode.Load() == writeNew })
	a.stop()
	if n := differFromExpected(t, pool); n != 0 {
		t.Errorf("%d rows differ from what the application last wrote", n)
	}
	nothingLeft(t, pool)
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
			defer w.stop()
			d := startDaemon(t, cfg)
			waitFor(t, 2*time.Minute, "phase "+when, func() bool { return phase(t, pool) == when })
			r := cli(t, time.Minute, nil, "abort", "--rollback", "--config", cfg)
			if r.code != 0 {
				t.Fatalf("abort\n%s", r)
			}
			if code := d.wait(t, time.Minute); code != 0 {
				t.Errorf("daemon exit %d after abort\n%s", code, d.output())
			}
			w.stop()
			if p := phase(t, pool); p != "aborted" {
				t.Errorf("phase %s", p)
			}
			if hasColumn(t, pool, "first_name") || hasColumn(t, pool, "last_name") {
				t.Error("rollback left the new columns")
			}
			nothingLeft(t, pool)
			if w.errs.Load() != 0 {
				t.Errorf("%d application writes failed", w.errs.Load())
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
	defer a.stop()
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: manual\n  hold: 1s\nbackfill:\n  batch_size: 2000\n  target_batch_time: 0s\n")
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	a.mode.Store(writeBoth)
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
	waitFor(t, time.Minute, "the app to switch to the new columns", func() bool { return a.mode.Load() == writeNew })
	a.stop()
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
