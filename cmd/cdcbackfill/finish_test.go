package main

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/workload"
	"github.com/cdcbackfill/cdcbackfill/phases"
)

// The safe finish (issue 11): the application's behaviour decides when to
// contract, never the clock, and its data is never overwritten.

// status runs `status --json` and decodes it.
func status(t *testing.T, cfg string) phases.StatusReport {
	t.Helper()
	r := cli(t, 30*time.Second, nil, "status", "--json", "--config", cfg)
	if r.code != 0 {
		t.Fatalf("status\n%s", r)
	}
	var s phases.StatusReport
	if err := json.Unmarshal([]byte(r.stdout), &s); err != nil {
		t.Fatalf("status --json: %v\n%s", err, r)
	}
	return s
}

// phaseLasted is true once the migration has been in its phase for d, by
// the server's clock.
func phaseLasted(t *testing.T, pool *pgxpool.Pool, d time.Duration) bool {
	return query[bool](t, pool, `SELECT now() - phase_started_at >= $1 FROM cdcbackfill.migrations`, d)
}

// emailWriter is an application that changes only a column the
// expressions do not read.
func emailWriter(t *testing.T, pool *pgxpool.Pool) (stop func() int64) {
	ctx, cancel := context.WithCancel(context.Background())
	var n atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ctx.Err() == nil; i++ {
			if _, err := pool.Exec(ctx, `UPDATE users SET email = $2 WHERE id = $1`, i%1000+1, fmt.Sprintf("m%d", i)); err == nil {
				n.Add(1)
			}
			time.Sleep(3 * time.Millisecond)
		}
	}()
	return func() int64 { cancel(); <-done; return n.Load() }
}

// TestIdleOrOtherColumnsIsNoDualWrite (scenario 1): with detect auto, an
// application that writes nothing, then writes only other columns, is not
// taken for a dual-writing one however long that lasts; evidence comes
// only from writes of the new columns, and status says what is missing.
// Once the application does dual-write, detection follows.
func TestIdleOrOtherColumnsIsNoDualWrite(t *testing.T) {
	dsn, pool := seed(t, 5000)
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: auto\n  quiet_period: 1s\n  min_evidence: 50\ncontract_policy:\n  mode: never\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	defer func() {
		if t.Failed() {
			t.Log(d.output())
		}
	}()
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	// Idle: many quiet periods of silence, with the daemon's own state
	// writes and keepalives going through the stream meanwhile.
	waitFor(t, time.Minute, "sync to last 4 quiet periods", func() bool { return phaseLasted(t, pool, 4*time.Second) })
	s := status(t, cfg)
	if s.Phase != "sync" {
		t.Fatalf("an idle application was taken for a dual-writing one: phase %s", s.Phase)
	}
	if s.Sync.DualWrite == nil || !strings.Contains(s.Sync.DualWrite.Missing, "no application writes of the new columns seen") {
		t.Errorf("status does not say what is missing: %+v", s.Sync.DualWrite)
	}
	// Writes of another column only.
	events := query[int64](t, pool, `SELECT sync_events FROM cdcbackfill.migrations`)
	stop := emailWriter(t, pool)
	waitFor(t, time.Minute, "the stream to see 600 events of email writes over 4 quiet periods", func() bool {
		return query[int64](t, pool, `SELECT sync_events FROM cdcbackfill.migrations`) > events+600 && phaseLasted(t, pool, 8*time.Second)
	})
	n := stop()
	if p := phase(t, pool); p != "sync" {
		t.Fatalf("an application writing only other columns (%d writes) was taken for a dual-writing one: phase %s", n, p)
	}
	if s := status(t, cfg); s.Sync.DualWrite == nil || s.Sync.DualWrite.Evidence != 0 {
		t.Errorf("email-only writes counted as evidence: %+v", s.Sync.DualWrite)
	}
	// Now the application dual-writes: inserts and renames that set the
	// new columns as the expressions say.
	seedExpected(t, pool)
	a := startApp(t, pool, 2, 5000)
	defer a.Stop()
	a.Deploy(workload.WritesBoth)
	waitFor(t, time.Minute, "dual-write detected", func() bool {
		if phase(t, pool) == "verify" {
			return true
		}
		return false
	})
	ev := query[int64](t, pool, `SELECT (detail->>'evidence')::bigint FROM cdcbackfill.events WHERE kind = 'phase' AND phase = 'verify'`)
	if ev < 50 {
		t.Errorf("detected with %d pieces of evidence, want >= min_evidence 50", ev)
	}
}

// TestApplicationOwnsNewColumnsAfterApprove (scenario 3): once dual-write
// is approved the daemon never writes the new columns. A row the
// application writes with values its expressions disagree with is kept as
// written, reported with its key and both values, and holds the contract
// until an operator accepts it; accepting is recorded and the migration
// then finishes with the application's values intact.
func TestApplicationOwnsNewColumnsAfterApprove(t *testing.T) {
	dsn, pool := seed(t, 5000)
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: auto\n  hold: 1s\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	} else {
		mustContain(t, r, "from now on the application owns first_name, last_name; the daemon will not write them")
	}
	// The deploy pipeline moves on the moment approve returns: no wait for
	// the daemon to notice.
	exec1(t, dsn, `UPDATE users SET full_name = 'Mary Ann Smith', first_name = 'Mary Ann', last_name = 'Smith' WHERE id = 7`)
	var s phases.StatusReport
	waitFor(t, time.Minute, "status to report the row", func() bool {
		s = status(t, cfg)
		return s.Verify.Mismatches > 0
	})
	if len(s.Verify.MismatchSamples) != 1 || s.Verify.MismatchSamples[0].Key != "(id)=(7)" {
		t.Fatalf("mismatch samples %+v, want (id)=(7)", s.Verify.MismatchSamples)
	}
	v := s.Verify.MismatchSamples[0].Columns["first_name"]
	if v.Actual == nil || *v.Actual != "Mary Ann" || v.Expected == nil || *v.Expected != "Mary" {
		t.Errorf("first_name values %+v, want actual Mary Ann, expected Mary", v)
	}
	r := cli(t, 10*time.Second, nil, "status", "--config", cfg)
	mustContain(t, r, `(id)=(7): first_name="Mary Ann" (expression "Mary")`, "out of parity now 1")
	// It holds the contract: the hold never completes while it stands.
	waitFor(t, time.Minute, "verify to wait on the row", func() bool {
		st := status(t, cfg)
		return st.Verify.PassDone && strings.Contains(st.Waiting, "rows out of parity") && phaseLasted(t, pool, 3*time.Second)
	})
	if p := phase(t, pool); p != "verify" {
		t.Fatalf("phase %s with a row out of parity outstanding, want verify", p)
	}
	if got := query[string](t, pool, `SELECT first_name FROM users WHERE id = 7`); got != "Mary Ann" {
		t.Fatalf("the application's first_name was overwritten: %q", got)
	}
	if !strings.Contains(d.output(), `first_name=\"Mary Ann\" (expression \"Mary\")`) {
		t.Errorf("the log does not report the row with both values\n%s", d.output())
	}
	r = cli(t, 10*time.Second, nil, "approve", "--accept-mismatches", "--config", cfg)
	if r.code != 0 {
		t.Fatalf("approve --accept-mismatches\n%s", r)
	}
	mustContain(t, r, "1 rows out of parity accepted")
	if code := d.wait(t, 2*time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	if got := query[string](t, pool, `SELECT first_name || '/' || last_name FROM users WHERE id = 7`); got != "Mary Ann/Smith" {
		t.Errorf("row 7 after done: %q, want the application's Mary Ann/Smith", got)
	}
	if n := query[int64](t, pool, `SELECT accepted_mismatches FROM cdcbackfill.migrations`); n != 1 {
		t.Errorf("accepted_mismatches %d, want 1", n)
	}
	if n := query[int64](t, pool, `SELECT count(*) FROM cdcbackfill.events WHERE kind = 'accept_mismatches'`); n != 1 {
		t.Errorf("%d accept events, want 1", n)
	}
}

// TestApproveHandsOverAtItsCommit: the hand-over is the position approve
// records, not the moment the daemon notices. A paused daemon does not act
// on approve, so the application's write lands while the daemon still
// runs sync and its stream still corrects: the write must survive all the
// same, reported as out of parity, and the migration hands over once
// resumed.
func TestApproveHandsOverAtItsCommit(t *testing.T) {
	dsn, pool := seed(t, 2000)
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\n")
	startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if r := cli(t, 10*time.Second, nil, "pause", "--config", cfg); r.code != 0 {
		t.Fatalf("pause\n%s", r)
	}
	// Before approve the daemon corrects: the old release's write is fixed.
	exec1(t, dsn, `UPDATE users SET full_name = 'Ann Lee', first_name = 'x' WHERE id = 5`)
	waitFor(t, time.Minute, "row 5 corrected before approve", func() bool {
		return query[string](t, pool, `SELECT first_name FROM users WHERE id = 5`) == "Ann"
	})
	r := cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	if r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	mustContain(t, r, "from now on the application owns first_name, last_name; the daemon will not write them")
	exec1(t, dsn, `UPDATE users SET full_name = 'Mary Ann Smith', first_name = 'Mary Ann', last_name = 'Smith' WHERE id = 7`)
	waitFor(t, time.Minute, "the write to be reported out of parity", func() bool {
		return status(t, cfg).Verify.Mismatches > 0
	})
	if p := phase(t, pool); p != "sync" {
		t.Fatalf("phase %s while paused, want sync: the test needs the daemon not to have acted on approve", p)
	}
	if got := query[string](t, pool, `SELECT first_name FROM users WHERE id = 7`); got != "Mary Ann" {
		t.Fatalf("the application's write after approve returned was overwritten: first_name %q", got)
	}
	if r := cli(t, 10*time.Second, nil, "resume", "--config", cfg); r.code != 0 {
		t.Fatalf("resume\n%s", r)
	}
	waitFor(t, time.Minute, "phase verify", func() bool { return phase(t, pool) == "verify" })
	recorded := query[string](t, pool, `SELECT (detail->>'handover_lsn') FROM cdcbackfill.events WHERE kind = 'approve'`)
	if got := query[string](t, pool, `SELECT handover_lsn::text FROM cdcbackfill.migrations`); got != recorded {
		t.Errorf("hand-over at %s, want the position approve recorded, %s", got, recorded)
	}
	if got := query[string](t, pool, `SELECT first_name FROM users WHERE id = 7`); got != "Mary Ann" {
		t.Errorf("first_name %q after the hand-over, want the application's Mary Ann", got)
	}
}

// TestCutoverBoundsTheDDLsHold: lock_timeout bounds the wait for the lock,
// contract_policy.max_hold how long the contract DDL then holds it. A
// contract statement that scans for longer (here a CHECK that sleeps a
// millisecond a row: seconds over the table) is rolled back at max_hold,
// the lock released, and the migration waits in contract for the
// operator, naming the statement, instead of retrying it blindly.
func TestCutoverBoundsTheDDLsHold(t *testing.T) {
	dsn, pool := seed(t, 5000)
	cfg := writeConfig(t, strings.Replace(usersConfig(dsn), "contract:\n",
		"contract:\n  - /* cdcbackfill:allow scan */ ALTER TABLE users ADD CONSTRAINT slow CHECK (pg_sleep(0.001) IS NOT NULL)\n", 1)+`dual_write:
  detect: manual
contract_policy:
  mode: auto
  hold: 1s
  lock_timeout: 200ms
  max_hold: 300ms
`)
	d := startDaemon(t, cfg)
	defer func() {
		if t.Failed() {
			t.Log(d.output())
		}
	}()
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	// The probe runs before approve, so it sees the first cut-over too.
	probe := startStallProbe(t, pool)
	defer probe.stop()
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	waitFor(t, time.Minute, "phase contract", func() bool { return phase(t, pool) == "contract" })
	var s phases.StatusReport
	waitFor(t, time.Minute, "the cut-over to give up on the slow statement", func() bool {
		s = status(t, cfg)
		return strings.Contains(s.Waiting, "longer than contract_policy.max_hold")
	})
	waitFor(t, 10*time.Second, "the daemon to stay put in contract", func() bool { return phaseLasted(t, pool, time.Second) })
	longest := probe.stop()
	for _, want := range []string{`ALTER TABLE users ADD CONSTRAINT slow CHECK (pg_sleep(0.001) IS NOT NULL)"`, "cdcbackfill approve"} {
		if !strings.Contains(s.Waiting, want) {
			t.Errorf("status waiting %q lacks %q", s.Waiting, want)
		}
	}
	if p := phase(t, pool); p != "contract" {
		t.Errorf("phase %s, want contract", p)
	}
	if !hasColumn(t, pool, "full_name") {
		t.Error("the old column was dropped although the cut-over rolled back")
	}
	if n := query[int64](t, pool, `SELECT count(*) FROM pg_constraint WHERE conname = 'slow'`); n != 0 {
		t.Error("the slow constraint exists: the cut-over did not roll back")
	}
	if n := strings.Count(d.output(), "cut-over rolled back"); n != 1 {
		t.Errorf("%d cut-overs rolled back by max_hold, want 1 (no blind retry)", n)
	}
	// The stall is bounded: the lock wait, the stream's catch-up (tens of
	// ms) and max_hold; without the bound the statement held it ~5 s.
	if bound := 300*time.Millisecond + 200*time.Millisecond + 500*time.Millisecond; longest > bound {
		t.Errorf("the application waited %s, more than max_hold + lock_timeout + 500ms = %s", longest, bound)
	}
	t.Logf("the application's slowest round trip: %s", longest)
}

// stallProbe is an application reading and writing one row in a loop,
// recording its slowest round trip.
type stallProbe struct {
	cancel  context.CancelFunc
	done    chan struct{}
	longest atomic.Int64 // nanoseconds
}

func startStallProbe(t *testing.T, pool *pgxpool.Pool) *stallProbe {
	ctx, cancel := context.WithCancel(context.Background())
	p := &stallProbe{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for ctx.Err() == nil {
			begin := time.Now()
			_ = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, `SELECT email FROM users WHERE id = 1`); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, `UPDATE users SET email = 'probe' WHERE id = 2`)
				return err
			})
			if took := time.Since(begin); took.Nanoseconds() > p.longest.Load() && ctx.Err() == nil {
				p.longest.Store(took.Nanoseconds())
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return p
}

func (p *stallProbe) stop() time.Duration {
	p.cancel()
	<-p.done
	return time.Duration(p.longest.Load())
}

// TestCutoverSeesEveryWrite (scenario 4): while the cut-over retries
// behind a lock it cannot get, a straggler of the old release writes the
// old column only. Nothing drops the column over that write: it is found
// (by the stream between tries, or under the cut-over's lock), reported,
// and the migration goes back to verify. Once the application fixes the
// row the migration finishes; the application's longest stall during the
// cut-over is measured.
func TestCutoverSeesEveryWrite(t *testing.T) {
	dsn, pool := seed(t, 5000)
	cfg := writeConfig(t, usersConfig(dsn)+`dual_write:
  detect: manual
contract_policy:
  mode: manual
  hold: 1s
  lock_timeout: 200ms
ddl:
  max_retries: 1000
`)
	d := startDaemon(t, cfg)
	defer func() {
		if t.Failed() {
			t.Log(d.output())
		}
	}()
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	waitFor(t, time.Minute, "phase contract", func() bool { return phase(t, pool) == "contract" })

	// A long reader holds the table: the cut-over cannot get its lock.
	holder, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	exec := func(sql string) {
		if _, err := holder.Exec(context.Background(), sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec("BEGIN")
	exec("SELECT count(*) FROM users")
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	waitFor(t, time.Minute, "the cut-over to retry behind the lock", func() bool {
		return strings.Contains(d.output(), "cut-over could not get the table's lock")
	})
	// The straggler: an old-release write of full_name only, between tries.
	exec1(t, dsn, `UPDATE users SET full_name = 'Late Writer' WHERE id = 5`)
	exec("COMMIT")
	waitFor(t, time.Minute, "the write to be reported", func() bool {
		s := status(t, cfg)
		return s.Verify.Mismatches > 0 || s.Phase == "done"
	})
	if !hasColumn(t, pool, "full_name") {
		t.Fatal("the old column was dropped over a write the stream had not checked")
	}
	s := status(t, cfg)
	if len(s.Verify.MismatchSamples) == 0 || s.Verify.MismatchSamples[0].Key != "(id)=(5)" {
		t.Fatalf("mismatch samples %+v, want (id)=(5)", s.Verify.MismatchSamples)
	}
	waitFor(t, time.Minute, "phase verify", func() bool { return phase(t, pool) == "verify" })

	// The application fixes the row; the migration goes on, and the
	// cut-over commits while an application reads and writes.
	exec1(t, dsn, `UPDATE users SET first_name = 'Late', last_name = 'Writer' WHERE id = 5`)
	waitFor(t, time.Minute, "phase contract again", func() bool { return phase(t, pool) == "contract" })
	probe := startStallProbe(t, pool)
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	if code := d.wait(t, time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	longest := probe.stop()
	for _, l := range strings.Split(d.output(), "\n") {
		if strings.Contains(l, "cut-over committed") {
			t.Log(l)
		}
	}
	if got := query[string](t, pool, `SELECT first_name || '/' || last_name FROM users WHERE id = 5`); got != "Late/Writer" {
		t.Errorf("row 5: %q, want Late/Writer", got)
	}
	s = status(t, cfg)
	if s.Contract.Cutover == nil {
		t.Fatal("status does not report the cut-over")
	}
	t.Logf("cut-over: %d tries, longest stall %.1f ms (daemon's measure), lock wait %.1f ms, held %.1f ms; the application's slowest round trip %s",
		s.Contract.Cutover.Tries, s.Contract.Cutover.LongestStallMS, s.Contract.Cutover.LockWaitMS, s.Contract.Cutover.HeldMS, longest)
	// lock_timeout 200ms + catchup_timeout 1s bound a try; far less is usual.
	if longest > 2*time.Second {
		t.Errorf("the application stalled %s during the cut-over", longest)
	}
	nothingLeft(t, pool)
}

// TestHoldCountsOnlyProvenTime (scenario 4): the hold is counted in
// database time proven clean. The daemon is killed part-way through the
// hold; while it is down (longer than the hold) a straggler writes the old
// column only. The restarted daemon does not count the downtime: it
// replays the stream, finds the row, and stays in verify.
func TestHoldCountsOnlyProvenTime(t *testing.T) {
	dsn, pool := seed(t, 5000)
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: auto\n  hold: 4s\n")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	waitFor(t, time.Minute, "a second of hold proven", func() bool {
		return query[int64](t, pool, `SELECT hold_proven_ms FROM cdcbackfill.migrations`) >= 1000
	})
	d.kill()
	killedAt := query[time.Time](t, pool, `SELECT now()`)
	exec1(t, dsn, `UPDATE users SET full_name = 'Down Time' WHERE id = 9`)
	waitFor(t, time.Minute, "a downtime longer than the hold", func() bool {
		return query[bool](t, pool, `SELECT now() - $1::timestamptz > interval '5 seconds'`, killedAt)
	})
	d = startDaemon(t, cfg)
	waitFor(t, time.Minute, "the row written while down to be reported", func() bool {
		return status(t, cfg).Verify.Mismatches > 0 || phase(t, pool) != "verify"
	})
	if p := phase(t, pool); p != "verify" {
		t.Fatalf("phase %s: the downtime counted toward the hold", p)
	}
	if !hasColumn(t, pool, "full_name") {
		t.Fatal("full_name dropped")
	}
	if ms := query[int64](t, pool, `SELECT hold_proven_ms FROM cdcbackfill.migrations`); ms >= 4000 {
		t.Errorf("hold proven %d ms after a mismatch", ms)
	}
	d.kill()
}

// TestAbortEveryPhase: abort --rollback is honoured in every phase until
// the contract DDL commits (waiting for approval, and between cut-over
// tries behind a lock included), fast, leaving the table as before expand
// and nothing behind; after the DDL it says plainly that it is too late.
func TestAbortEveryPhase(t *testing.T) {
	cases := []struct {
		phase string
		extra string
		lock  bool // hold a lock on users once the phase is reached (expand: before the daemon starts)
	}{
		{phase: "expand", lock: true},
		{phase: "backfill", extra: "backfill:\n  max_rows_per_second: 2000\n  batch_size: 500\n"},
		{phase: "sync"},
		{phase: "verify", extra: "backfill:\n  max_rows_per_second: 2000\n  batch_size: 200\n  target_batch_time: 0s\n"},
		{phase: "contract"}, // waiting for approval
		{phase: "contract", lock: true},
	}
	for _, c := range cases {
		name := c.phase
		if c.lock {
			name += "_behind_a_lock"
		}
		t.Run(name, func(t *testing.T) {
			dsn, pool := seed(t, 10000)
			cfg := writeConfig(t, usersConfig(dsn)+"rollback:\n  - ALTER TABLE users DROP COLUMN first_name, DROP COLUMN last_name\n"+
				"dual_write:\n  detect: manual\ncontract_policy:\n  mode: manual\n  hold: 1s\n  lock_timeout: 200ms\nddl:\n  max_retries: 1000\n  lock_timeout: 300ms\n"+c.extra)
			var holder *pgx.Conn
			lock := func() {
				var err error
				if holder, err = pgx.Connect(context.Background(), dsn); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { holder.Close(context.Background()) })
				if _, err := holder.Exec(context.Background(), "BEGIN; LOCK TABLE users IN ACCESS SHARE MODE"); err != nil {
					t.Fatal(err)
				}
			}
			seedExpected(t, pool)
			a := startApp(t, pool, 2, 10000)
			defer a.Stop()
			if c.phase == "expand" {
				lock()
			}
			d := startDaemon(t, cfg)
			if c.phase != "expand" && c.phase != "backfill" {
				waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
				a.Deploy(workload.WritesBoth) // the release that dual-writes
			}
			if c.phase == "verify" || c.phase == "contract" {
				cli(t, 10*time.Second, nil, "approve", "--config", cfg)
			}
			waitFor(t, 2*time.Minute, "phase "+c.phase, func() bool { return phase(t, pool) == c.phase })
			if c.phase == "contract" && c.lock {
				lock()
				cli(t, 10*time.Second, nil, "approve", "--config", cfg)
				waitFor(t, time.Minute, "a cut-over try behind the lock", func() bool {
					return strings.Contains(d.output(), "cut-over could not get the table's lock")
				})
			}
			if c.phase == "expand" {
				waitFor(t, time.Minute, "expand to retry behind the lock", func() bool {
					return strings.Contains(d.output(), "DDL waits for a lock")
				})
			}
			// The operator rolls the application back to the release that
			// writes full_name only, then aborts; a lock holder ends once
			// the abort is requested (the rollback DDL needs the table).
			a.RollBack(workload.WritesOld)
			if holder != nil {
				go func() {
					for {
						var asked bool
						_ = pool.QueryRow(context.Background(), `SELECT abort_requested FROM cdcbackfill.migrations`).Scan(&asked)
						if asked {
							break
						}
						time.Sleep(20 * time.Millisecond)
					}
					holder.Close(context.Background())
				}()
			}
			began := time.Now()
			r := cli(t, time.Minute, nil, "abort", "--rollback", "--config", cfg)
			if r.code != 0 {
				t.Fatalf("abort\n%s\ndaemon:\n%s", r, d.output())
			}
			if took := time.Since(began); took > 20*time.Second {
				t.Errorf("abort took %s", took)
			}
			if code := d.wait(t, time.Minute); code != 0 {
				t.Errorf("daemon exit %d after abort\n%s", code, d.output())
			}
			a.Stop()
			if p := phase(t, pool); p != "aborted" {
				t.Errorf("phase %s", p)
			}
			if hasColumn(t, pool, "first_name") || hasColumn(t, pool, "last_name") {
				t.Error("rollback left the new columns")
			}
			if !hasColumn(t, pool, "full_name") {
				t.Error("full_name is gone")
			}
			nothingLeft(t, pool)
			if f := a.Failures(); len(f) != 0 {
				t.Errorf("%d application transactions failed; first: %v", len(f), f[0].Err)
			}
			if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code == 0 {
				t.Errorf("approve after abort succeeded\n%s", r)
			}
		})
	}
}

// msgRE finds a slog text line's message.
var msgRE = regexp.MustCompile(`msg="((?:[^"\\]|\\.)*)"|msg=(\S+)`)

// TestRepeatedConditionsLogOnce: an application that keeps writing rows
// out of parity after approve (it is not dual-writing) makes the same
// condition repeat many times a second; the log says it once, then a
// summary with its count per interval, not a line per occurrence.
func TestRepeatedConditionsLogOnce(t *testing.T) {
	_, pool := seed(t, 20000)
	dsn := pool.Config().ConnString()
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: auto\n  hold: 1s\n")
	w := startWriters(t, pool, 3, 20000)
	defer w.Stop()
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	waitFor(t, time.Minute, "many rows out of parity", func() bool {
		return query[int64](t, pool, `SELECT verify_mismatches FROM cdcbackfill.migrations`) > 300
	})
	counts := map[string]int{}
	for _, line := range strings.Split(d.output(), "\n") {
		if m := msgRE.FindStringSubmatch(line); m != nil {
			counts[m[1]+m[2]]++
		}
	}
	for msg, n := range counts {
		if n > 5 {
			t.Errorf("logged %d times: %q", n, msg)
		}
	}
	d.kill()
}

// TestStateSchemaLeftAloneWhenComplete: a daemon starting (or a standby)
// runs no DDL on the state tables when the catalog has them complete, so
// a long reader of the state table does not hold it up (ALTER TABLE would
// queue behind that reader, and everything else behind the ALTER).
func TestStateSchemaLeftAloneWhenComplete(t *testing.T) {
	dsn, pool := seed(t, 2000)
	cfg := writeConfig(t, usersConfig(dsn))
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	d.kill()
	reader, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close(context.Background())
	if _, err := reader.Exec(context.Background(), "BEGIN; SELECT count(*) FROM cdcbackfill.migrations"); err != nil {
		t.Fatal(err)
	}
	heartbeat := query[string](t, pool, `SELECT coalesce(stats->>'heartbeat_at', '') FROM cdcbackfill.migrations`)
	d = startDaemon(t, cfg)
	waitFor(t, 30*time.Second, "the restarted daemon to lead with the state table read by another session", func() bool {
		return query[string](t, pool, `SELECT coalesce(stats->>'heartbeat_at', '') FROM cdcbackfill.migrations`) != heartbeat
	})
	d.kill()
}

// statementsOnce loads pg_stat_statements on the shared server (a
// restart, once per test binary) where the server can be restarted and has
// the library.
var statementsOnce struct {
	sync.Once
	why string // why it could not be loaded; "" when it is
}

func withStatements(t *testing.T) {
	t.Helper()
	statementsOnce.Do(func() {
		srv := pgtest.Shared(t)
		if srv.Kind() != "local" {
			statementsOnce.why = "the server (" + srv.Kind() + ") cannot be restarted with shared_preload_libraries"
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		conn, err := pgx.Connect(ctx, srv.DSN())
		if err != nil {
			statementsOnce.why = err.Error()
			return
		}
		defer conn.Close(context.Background())
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'`).Scan(&n); err != nil || n == 0 {
			statementsOnce.why = "the server has no pg_stat_statements"
			return
		}
		if _, err := conn.Exec(ctx, `ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'`); err != nil {
			statementsOnce.why = err.Error()
			return
		}
		if err := srv.Restart(ctx); err != nil {
			statementsOnce.why = err.Error()
		}
	})
	if statementsOnce.why != "" {
		t.Skip("pg_stat_statements not available: " + statementsOnce.why)
	}
}

// TestContractWaitsWhileOldColumnIsUsed: where pg_stat_statements is
// installed, a statement that still reads the old column (an old report,
// a cron job) keeps contract auto from dropping it, however clean parity
// is; status and the log name the statement, plan says the protection is
// on. Once it stops, the migration finishes.
func TestContractWaitsWhileOldColumnIsUsed(t *testing.T) {
	withStatements(t)
	dsn, pool := seed(t, 3000)
	exec1(t, dsn, `CREATE EXTENSION pg_stat_statements`)
	cfg := writeConfig(t, usersConfig(dsn)+"dual_write:\n  detect: manual\ncontract_policy:\n  mode: auto\n  hold: 2s\n")
	r := cli(t, 30*time.Second, nil, "plan", "--config", cfg)
	mustContain(t, r, "old column usage: pg_stat_statements shows the statements that still use full_name")
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })

	ctx, cancel := context.WithCancel(context.Background())
	reports := make(chan struct{})
	go func() {
		defer close(reports)
		for i := 0; ctx.Err() == nil; i++ {
			var s string
			_ = pool.QueryRow(ctx, `SELECT full_name FROM users WHERE id = $1`, i%3000+1).Scan(&s)
			time.Sleep(100 * time.Millisecond)
		}
	}()
	cli(t, 10*time.Second, nil, "approve", "--config", cfg)
	waitFor(t, time.Minute, "status to name the statement", func() bool {
		for _, u := range status(t, cfg).Verify.OldColumnStatements {
			if strings.Contains(u.Query, "SELECT full_name FROM users") {
				return true
			}
		}
		return false
	})
	waitFor(t, time.Minute, "two more holds", func() bool { return phaseLasted(t, pool, 8*time.Second) })
	if p := phase(t, pool); p != "verify" || !hasColumn(t, pool, "full_name") {
		t.Fatalf("phase %s: contract went on while a statement still read full_name", p)
	}
	if !strings.Contains(d.output(), "statements that use the old column without the new ones ran during the hold") {
		t.Errorf("the log does not name the statements\n%s", d.output())
	}
	cancel()
	<-reports
	if code := d.wait(t, time.Minute); code != 0 {
		t.Fatalf("daemon exit %d\n%s", code, d.output())
	}
	if hasColumn(t, pool, "full_name") {
		t.Error("full_name not dropped once nothing used it")
	}
}

// TestVerifyPassChecksEveryRow: rows out of parity that the stream never
// sees (written in a session with the daemon's replication origin, which
// the stream skips) are found by the verify pass alone, at the table's
// ends and on both sides of each chunk's boundaries, with the pass split
// among two connections (verify.workers) in small fixed chunks.
func TestVerifyPassChecksEveryRow(t *testing.T) {
	dsn, pool := seed(t, 10000)
	cfg := writeConfig(t, usersConfig(dsn)+`backfill:
  batch_size: 700
  target_batch_time: 0s
  sleep: 0s
verify:
  workers: 2
`)
	d := startDaemon(t, cfg)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	// Chunks of 700 values in two parts: parts end at 700, 1400, 2100, ...
	planted := []int{1, 700, 701, 1400, 1401, 2100, 4899, 4900, 9799, 9800, 10000}
	exec1(t, dsn, `SELECT pg_replication_origin_create('cdcbackfill_split_full_name.test')`,
		fmt.Sprintf(`DO $$ BEGIN
	PERFORM pg_replication_origin_session_setup('cdcbackfill_split_full_name.test');
	UPDATE users SET first_name = 'UNSEEN' WHERE id = ANY ('{%s}'::bigint[]);
END $$`, strings.Trim(strings.Join(strings.Fields(fmt.Sprint(planted)), ","), "[]")))
	if r := cli(t, 10*time.Second, nil, "approve", "--config", cfg); r.code != 0 {
		t.Fatalf("approve\n%s", r)
	}
	var s phases.StatusReport
	waitFor(t, time.Minute, "the verify pass to end", func() bool {
		s = status(t, cfg)
		return s.Phase == "verify" && s.Verify.PassDone
	})
	if s.Verify.RowsChecked != 10000 {
		t.Errorf("the pass checked %d rows, want 10000", s.Verify.RowsChecked)
	}
	if s.Verify.Mismatches != int64(len(planted)) {
		t.Errorf("the pass found %d rows out of parity, want the %d planted at %v\nlog:\n%s", s.Verify.Mismatches, len(planted), planted, d.output())
	}
	if !strings.Contains(d.output(), "connections=2") {
		t.Errorf("the pass was not split among 2 connections\n%s", d.output())
	}
}

// TestDeferredCorrectionFinishes: with sync.correction deferred the rows
// the application changes stay out of parity for up to defer_for, and
// status says how many keys wait and how old the oldest is; every row is
// corrected within it once the writes stop; dual-write is detected on
// evidence as in the continuous mode, and the migration reaches done with
// every row as the application last wrote it.
func TestDeferredCorrectionFinishes(t *testing.T) {
	_, pool := seed(t, 20000)
	dsn := pool.Config().ConnString()
	seedExpected(t, pool)
	a := startApp(t, pool, 2, 20000)
	defer a.Stop()
	cfg := writeConfig(t, autoConfig(dsn)+"sync:\n  correction: deferred\n  defer_for: 3s\n")
	d := startDaemon(t, cfg)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	var s phases.StatusReport
	waitFor(t, time.Minute, "status to show changed keys waiting over a second, their rows out of parity", func() bool {
		s = status(t, cfg)
		return s.Sync.Correction == "deferred" && s.Sync.DeferredKeys > 0 && s.Sync.LagSeconds >= 1 &&
			query[int64](t, pool, `SELECT count(*) FROM users WHERE first_name IS DISTINCT FROM split_part(full_name, ' ', 1)`) > 0
	})
	r := cli(t, 10*time.Second, nil, "status", "--config", cfg)
	mustContain(t, r, "deferred corrections: ", "keys waiting, the oldest", "(sync.defer_for 3s)")
	if s.Sync.LagSeconds > 3+2 {
		t.Errorf("the oldest waiting change is %.1fs old, beyond defer_for 3s", s.Sync.LagSeconds)
	}

	a.Deploy(workload.WritesBoth)
	finishesAsWritten(t, d, a, pool, 3*time.Minute)
}
