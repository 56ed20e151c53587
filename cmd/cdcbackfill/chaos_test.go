package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/workload"
)

// The chaos suite (issue 7): the whole lifecycle under an application load,
// with faults at random points, replayable from a printed seed. `make test`
// runs a short one (CHAOS_ITERATIONS defaults to 2), `make chaos` a long one.
//
// Each iteration seeds a fresh database, starts the application (the `app`
// of lifecycle_test.go: it records what it last wrote in its own table
// `expected`) and the daemon with detect auto and contract auto, then every
// 0.5-2 s injects one fault drawn from the seed: SIGKILL and restart of the
// daemon, a restart of the PostgreSQL server, pg_terminate_backend of the
// daemon's sessions, a lock on the table that only DDL conflicts with, or a
// pause and resume. Faults stop when the migration reaches contract (or after
// chaosFaultWindow); then the daemon must finish by itself. At the end every
// row holds what the application last wrote, the migration is done, the old
// column is gone and no slot, publication or origin is left. The fault
// choices and timings are replayable from the seed; the interleaving with
// the daemon and the server is not, as in production.
//
// Half the iterations also ask for first_name NOT NULL and an index on
// last_name and wait in contract for the test's approve: faults then land
// in contract (while the constraints are validated, while it waits for
// approve) and, one time in two, a SIGKILL lands inside the cut-over's
// transaction (kill_in_cutover); such an iteration ends with the index
// valid, first_name NOT NULL, and no check or INVALID index left.
//
// The straggler fault is an old-release writer (a pod not yet rolled, a cron
// job) that writes full_name only, at a low rate, for a few seconds, from
// sync on through verify and contract. The migration must never contract
// while it writes (its writes would then fail on the dropped column), and
// nothing it wrote may be lost: each of its writes is recorded in
// `expected` like the application's.

const (
	faultKill = iota
	faultServerRestart
	faultTerminate
	faultLock
	faultPause
	faultStraggler
	faultCutoverKill
	numFaults
)

var faultNames = [numFaults]string{"kill", "server_restart", "terminate", "lock", "pause", "straggler", "kill_in_cutover"}

const (
	chaosRows        = 20000
	chaosWriters     = 3
	chaosFaultWindow = 15 * time.Second // faults stop after this even before contract
	chaosDoneWithin  = 3 * time.Minute  // after the faults stop
	// restartGrace: after a server restart returns, the application's pool
	// still hands out connections that died with the old server.
	restartGrace = 5 * time.Second
	// chaosTuning slows the backfill (20k rows in about 5 s) so that faults
	// land in it, and keeps the end of the story short.
	chaosTuning = `backfill:
  batch_size: 500
  target_batch_time: 0s
  max_rows_per_second: 4000
ddl:
  lock_timeout: 1s
  max_retries: 100
`
)

// chaosTally is what the whole run adds up to.
type chaosTally struct {
	iterations, failed int
	faults             [numFaults]int
	byPhase            map[string]int
	terminated         int // backends ended by terminate faults
	rows, mismatches   int64
	appTxns            int64
	appRestartFailures int64 // failed in a server restart window: expected
	appOtherFailures   int64 // anything else: must be 0
	selfExits          int   // the daemon exited non-zero without being killed: must be 0
	stragglerWrites    int64
	stragglerLate      int64 // straggler writes that found the old column dropped: must be 0
	premature          int64 // auto-detected dual-writes proved premature
	seedsFailed        []uint64
}

func TestChaos(t *testing.T) {
	iterations := 2
	if s := os.Getenv("CHAOS_ITERATIONS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("CHAOS_ITERATIONS=%q: want a positive integer", s)
		}
		iterations = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CHAOS_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("CHAOS_SEED=%q: want an unsigned integer", s)
		}
		seed = n
	}
	msg := fmt.Sprintf("chaos seed=%d; replay with CHAOS_SEED=%d (iterations=%d)", seed, seed, iterations)
	t.Log(msg)
	fmt.Println(msg)

	tally := &chaosTally{byPhase: map[string]int{}}
	begin := time.Now()
	for i := 0; i < iterations; i++ {
		// Iteration i runs with seed+i, so one iteration replays alone
		// with CHAOS_SEED=seed+i CHAOS_ITERATIONS=1.
		iterSeed := seed + uint64(i)
		ok := t.Run(fmt.Sprintf("iteration_%02d", i+1), func(t *testing.T) {
			chaosIteration(t, i+1, iterations, iterSeed, tally)
		})
		tally.iterations++
		if !ok {
			tally.failed++
			tally.seedsFailed = append(tally.seedsFailed, iterSeed)
			fmt.Printf("chaos iteration %d FAILED: replay it alone with CHAOS_SEED=%d CHAOS_ITERATIONS=1\n", i+1, iterSeed)
		}
	}
	printChaosTable(seed, tally, time.Since(begin))
}

func printChaosTable(seed uint64, tally *chaosTally, took time.Duration) {
	var b strings.Builder
	row := func(name string, v any) { fmt.Fprintf(&b, "  %-44s %10v\n", name, v) }
	fmt.Fprintf(&b, "\nchaos summary (seed=%d)\n", seed)
	row("iterations", tally.iterations)
	row("iterations failed", tally.failed)
	total := 0
	for k, n := range tally.faults {
		row("faults: "+faultNames[k], n)
		total += n
	}
	row("faults: total", total)
	for _, p := range []string{"", "expand", "backfill", "sync", "verify", "contract"} {
		if n := tally.byPhase[p]; n > 0 {
			if p == "" {
				p = "(no state row yet)"
			}
			row("  of which in phase "+p, n)
		}
	}
	row("backends terminated", tally.terminated)
	row("daemon exits on its own (must be 0)", tally.selfExits)
	row("app transactions", tally.appTxns)
	row("app failures in server restarts", tally.appRestartFailures)
	row("app failures otherwise (must be 0)", tally.appOtherFailures)
	row("straggler writes", tally.stragglerWrites)
	row("straggler writes after contract (must be 0)", tally.stragglerLate)
	row("premature dual-write detections", tally.premature)
	row("rows checked", tally.rows)
	row("mismatches (must be 0)", tally.mismatches)
	row("total time", took.Round(time.Second))
	if len(tally.seedsFailed) > 0 {
		fmt.Fprintf(&b, "failed iteration seeds (replay each with CHAOS_SEED=<seed> CHAOS_ITERATIONS=1): %v\n", tally.seedsFailed)
	}
	fmt.Print(b.String())
}

// chaosRun is one iteration in progress.
type chaosRun struct {
	t       *testing.T
	rng     *rand.Rand
	begin   time.Time
	srv     *pgtest.Server
	pool    *pgxpool.Pool // the test's own queries, never the application's
	dsn     string
	cfg     string
	d       *daemon   // the daemon running now
	daemons []*daemon // all started, for the post-mortem
	app     *workload.App
	phases  *phaseWatch
	log     []string
	faults  [numFaults]int
	byPhase map[string]int
	killed  int // backends terminated
	exits   int // daemon exits on its own
	windows []window
	strag   *straggler
}

type window struct{ from, to time.Time }

func chaosIteration(t *testing.T, n, of int, iterSeed uint64, tally *chaosTally) {
	srv := pgtest.Shared(t)
	// Origins are the server's, not the database's: a failed iteration must
	// not leave them to fail the next one. (Registered first, runs last:
	// after the daemons are killed and the database dropped.)
	t.Cleanup(func() {
		if t.Failed() {
			dropChaosOrigins(srv.DSN())
		}
	})
	dsn, pool := seed(t, chaosRows)
	seedExpected(t, pool)

	c := &chaosRun{
		t:       t,
		rng:     rand.New(rand.NewPCG(iterSeed, 0x63680a05)),
		begin:   time.Now(),
		srv:     srv,
		pool:    pool,
		dsn:     dsn,
		byPhase: map[string]int{},
	}
	// Every session of the daemon carries an application_name starting with
	// cdcbackfill (phases.Connect and the slot's connection set
	// "cdcbackfill"; the pool and the stream take the DSN's), so terminate
	// faults find all of them and none of the application's.
	tuning := chaosTuning
	if c.rng.IntN(3) == 0 {
		// Corrections that wait: faults then land with keys held back.
		tuning += "sync:\n  correction: deferred\n  defer_for: 2s\n"
		t.Logf("sync.correction: deferred, defer_for 2s")
	}
	// Half the iterations ask for first_name NOT NULL and an index on
	// last_name, and wait in contract for approve: faults then land in
	// contract too (while the constraints are validated, while it waits,
	// inside the cut-over), and the end checks what was built.
	firstClass := c.rng.IntN(2) == 0
	yaml := autoConfig(withParam(dsn, "application_name=cdcbackfill-chaos"))
	if firstClass {
		yaml = strings.Replace(withNewColumnsFirstClass(yaml), "contract_policy:\n  mode: auto\n", "contract_policy:\n  mode: manual\n", 1)
		t.Logf("first_name NOT NULL, an index on last_name, contract approved by the test")
	}
	c.cfg = writeConfig(t, yaml+tuning)

	appPool, err := pgxpool.New(context.Background(), withParam(dsn, "application_name=chaos-app"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(appPool.Close)
	c.app = workload.Start(appPool, workload.Options{Writers: chaosWriters, Pause: 3 * time.Millisecond, MaxID: chaosRows,
		Seed: iterSeed, Mix: workload.Mix{SignUps: 2, Renames: 7, Deletes: 1}, Expected: "expected"})
	defer c.app.Stop()
	stragPool, err := pgxpool.New(context.Background(), withParam(dsn, "application_name=chaos-straggler"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stragPool.Close)
	c.strag = &straggler{pool: stragPool}
	defer c.strag.stop()
	c.phases = watchPhases(pool, c.app, c.begin)
	defer c.phases.stop()
	defer func() {
		if t.Failed() {
			c.postMortem()
		}
	}()
	// Counted also when the iteration fails half-way.
	var rows, bad int64
	var inRestart int
	var other []workload.Failure
	defer func() {
		for k, m := range c.faults {
			tally.faults[k] += m
		}
		for p, m := range c.byPhase {
			tally.byPhase[p] += m
		}
		tally.terminated += c.killed
		tally.selfExits += c.exits
		tally.rows += rows
		tally.mismatches += bad
		tally.appTxns += ops(c.app)
		tally.appRestartFailures += int64(inRestart)
		tally.appOtherFailures += int64(len(other))
		writes, late, _ := c.strag.writes()
		tally.stragglerWrites += writes
		tally.stragglerLate += late
		var premature int64
		_ = pool.QueryRow(context.Background(), `SELECT premature_detections FROM cdcbackfill.migrations`).Scan(&premature)
		tally.premature += premature
	}()

	if c.rng.IntN(3) == 0 {
		// A lock from before the start: expand has to wait and retry.
		c.faults[faultLock]++
		c.byPhase["expand"]++
		hold, release := c.lock("expand")
		c.d = startDaemon(t, c.cfg)
		c.daemons = append(c.daemons, c.d)
		c.note("daemon started")
		c.sleep(hold)
		release()
	} else {
		c.d = startDaemon(t, c.cfg)
		c.daemons = append(c.daemons, c.d)
		c.note("daemon started")
	}

	kinds := []int{faultKill, faultTerminate, faultLock, faultPause, faultStraggler}
	if srv.Kind() == "local" {
		kinds = append(kinds, faultServerRestart)
	} else {
		// env: Restart is not supported; docker: the container may come
		// back on another port, which the daemon's config cannot follow.
		c.note("no server restarts: the server is %s", srv.Kind())
	}

	faultsUntil := time.Now().Add(chaosFaultWindow)
	finished := false
	for time.Now().Before(faultsUntil) && !finished {
		wait := 500*time.Millisecond + time.Duration(c.rng.Int64N(int64(1500*time.Millisecond)))
		if finished = c.sleep(wait); finished {
			break
		}
		ph := c.phases.current()
		if ph == "contract" || ph == "done" {
			break
		}
		kind := kinds[c.rng.IntN(len(kinds))]
		if kind == faultPause && ph == "" {
			kind = faultKill // no state row to pause yet
		}
		if kind == faultStraggler && ph != "sync" && ph != "verify" && ph != "contract" {
			kind = faultLock // the old release's writes matter once the new one dual-writes
		}
		c.inject(kind, ph)
	}
	if firstClass && !finished {
		finished = c.contractFaults()
	}
	c.note("faults stop (phase %s)", c.phases.current())

	// Now the daemon finishes by itself; one that dies is restarted (and
	// that is an error of its own, reported by sleep).
	deadline := time.Now().Add(chaosDoneWithin)
	for !finished {
		if time.Now().After(deadline) {
			t.Fatalf("migration not done %s after the faults stopped: phase %s", chaosDoneWithin, c.phases.current())
		}
		finished = c.sleep(time.Second)
	}
	c.note("daemon exited 0")

	if p := phase(t, pool); p != "done" {
		t.Fatalf("daemon exited 0 in phase %q", p)
	}
	c.phases.saw("done")
	waitFor(t, time.Minute, "the app to switch to the new columns", func() bool { return c.app.Release() == workload.WritesNew })
	c.app.Stop()
	c.strag.stop()
	c.phases.stop()
	if _, n, _ := c.strag.writes(); n > 0 {
		t.Errorf("the old column was dropped while the straggler still wrote it: %d of its writes failed on it", n)
	}

	rows = query[int64](t, pool, `SELECT count(*) FROM users`)
	bad = differFromExpected(t, pool)
	if bad != 0 {
		t.Errorf("%d of %d rows differ from what the application last wrote; some:\n%s", bad, rows, sampleDiffs(t, pool))
	}
	if hasColumn(t, pool, "full_name") {
		t.Error("full_name still exists after done")
	}
	nothingLeft(t, pool)
	if firstClass {
		if !query[bool](t, pool, `SELECT attnotnull FROM pg_attribute WHERE attrelid = 'users'::regclass AND attname = 'first_name'`) {
			t.Error("first_name is not NOT NULL at done")
		}
		if n := query[int64](t, pool, `SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'users_last' AND i.indisvalid`); n != 1 {
			t.Error("the index users_last is missing or INVALID at done")
		}
		if n := query[int64](t, pool, `SELECT count(*) FROM pg_index WHERE indrelid = 'users'::regclass AND NOT indisvalid`); n != 0 {
			t.Errorf("%d INVALID indexes left on users", n)
		}
		if n := query[int64](t, pool, `SELECT count(*) FROM pg_constraint WHERE conrelid = 'users'::regclass AND contype = 'c'`); n != 0 {
			t.Errorf("%d check constraints left behind", n)
		}
	}
	_, _, stragFailures := c.strag.writes()
	inRestart, other = classify(append(c.app.Failures(), stragFailures...), c.windows)
	if len(other) > 0 {
		var b strings.Builder
		for i, f := range other {
			if i == 5 {
				fmt.Fprintf(&b, "  ... and %d more\n", len(other)-5)
				break
			}
			fmt.Fprintf(&b, "  +%.2fs %v\n", f.At.Sub(c.begin).Seconds(), f.Err)
		}
		t.Errorf("%d application transactions failed outside server restarts:\n%s", len(other), b.String())
	}

	total := 0
	var parts []string
	for k, m := range c.faults {
		total += m
		parts = append(parts, fmt.Sprintf("%s %d", faultNames[k], m))
	}
	t.Logf("faults:\n  %s", strings.Join(c.log, "\n  "))
	fmt.Printf("chaos iteration %d/%d seed=%d: %d faults (%s), phases %s, %d rows, %d mismatches, app %d txns (%d failed in server restarts, %d otherwise), %s\n",
		n, of, iterSeed, total, strings.Join(parts, ", "), c.phases.path(), rows, bad,
		ops(c.app), inRestart, len(other), time.Since(c.begin).Round(100*time.Millisecond))
}

// contractFaults waits for contract (where the daemon waits for
// approve), lands a few faults there, approves, and half the time kills the
// daemon inside the cut-over's transaction. It returns true when the
// daemon is done.
func (c *chaosRun) contractFaults() bool {
	deadline := time.Now().Add(2 * time.Minute)
	for c.phases.current() != "contract" {
		if p := c.phases.current(); p == "done" {
			return c.sleep(time.Second)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("contract not reached within 2m: phase %s", c.phases.current())
		}
		if c.sleep(200 * time.Millisecond) {
			return true
		}
	}
	kinds := []int{faultKill, faultTerminate, faultLock, faultPause}
	if c.srv.Kind() == "local" {
		kinds = append(kinds, faultServerRestart)
	}
	for range 3 + c.rng.IntN(3) {
		if c.sleep(200*time.Millisecond + time.Duration(c.rng.Int64N(int64(800*time.Millisecond)))) {
			return true
		}
		c.inject(kinds[c.rng.IntN(len(kinds))], "contract")
	}
	if r := cli(c.t, 30*time.Second, nil, "approve", "--config", c.cfg); r.code != 0 {
		c.t.Fatalf("approve the contract\n%s", r)
	}
	c.note("[contract] approve")
	if c.rng.IntN(2) == 0 {
		c.killInCutover()
	}
	return false
}

// killInCutover SIGKILLs the daemon the moment a session of it holds the
// table's ACCESS EXCLUSIVE lock: inside the cut-over's transaction, which
// the server then rolls back.
func (c *chaosRun) killInCutover() {
	c.faults[faultCutoverKill]++
	c.byPhase["contract"]++
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		select {
		case <-c.d.Done():
			c.note("[contract] kill_in_cutover: missed, the daemon ended first")
			return
		default:
		}
		var held bool
		err := c.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
			WHERE l.locktype = 'relation' AND l.relation = 'users'::regclass AND l.mode = 'AccessExclusiveLock' AND l.granted
			  AND a.application_name LIKE 'cdcbackfill%')`).Scan(&held)
		if err == nil && held {
			c.d.kill()
			c.note("[contract] kill_in_cutover: SIGKILL while the cut-over held the table's lock")
			c.d = startDaemon(c.t, c.cfg)
			c.daemons = append(c.daemons, c.d)
			return
		}
	}
	c.note("[contract] kill_in_cutover: missed, no cut-over within 30s")
}

// note adds a line to the iteration's fault log.
func (c *chaosRun) note(format string, args ...any) {
	c.log = append(c.log, fmt.Sprintf("+%6.2fs %s", time.Since(c.begin).Seconds(), fmt.Sprintf(format, args...)))
}

// sleep waits for d, watching the daemon: it returns true when the daemon
// exited 0 (the migration is done). A daemon that exits non-zero without
// being killed is an error (it must survive the faults by itself); it is
// restarted, as systemd would, so the iteration can go on.
func (c *chaosRun) sleep(d time.Duration) bool {
	until := time.Now().Add(d)
	for {
		select {
		case <-c.d.Done():
			if c.d.Code() == 0 {
				return true
			}
			c.exits++
			c.note("daemon EXITED %d on its own; restarting it", c.d.Code())
			c.t.Errorf("the daemon exited %d on its own at +%.2fs in phase %s; faults so far:\n  %s\nits output ends:\n%s",
				c.d.Code(), time.Since(c.begin).Seconds(), c.phases.current(), strings.Join(c.log, "\n  "), tail(c.d.output(), 30))
			if c.exits > 5 {
				c.t.Fatal("the daemon keeps exiting")
			}
			c.d = startDaemon(c.t, c.cfg)
			c.daemons = append(c.daemons, c.d)
		default:
		}
		left := time.Until(until)
		if left <= 0 {
			return false
		}
		select {
		case <-c.d.Done():
		case <-time.After(min(left, 100*time.Millisecond)):
		}
	}
}

func (c *chaosRun) inject(kind int, ph string) {
	t := c.t
	c.faults[kind]++
	c.byPhase[ph]++
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	switch kind {
	case faultKill:
		c.d.kill()
		delay := time.Duration(c.rng.Int64N(int64(time.Second)))
		c.note("[%s] kill: SIGKILL the daemon, start it again after %s", ph, delay.Round(time.Millisecond))
		time.Sleep(delay)
		c.d = startDaemon(t, c.cfg)
		c.daemons = append(c.daemons, c.d)

	case faultServerRestart:
		c.note("[%s] server_restart: begins", ph)
		from := time.Now()
		if err := c.srv.Restart(ctx); err != nil {
			t.Fatalf("restart the server: %v", err)
		}
		waitFor(t, time.Minute, "the server back", func() bool { return c.pool.Ping(ctx) == nil })
		c.windows = append(c.windows, window{from, time.Now()})
		c.note("[%s] server_restart: back after %s", ph, time.Since(from).Round(time.Millisecond))

	case faultTerminate:
		all := c.rng.IntN(2) == 0
		pick := c.rng.IntN(1000)
		type backend struct {
			pid        int
			app, btype string
		}
		rows, err := c.pool.Query(ctx, `SELECT pid, application_name, backend_type FROM pg_stat_activity
			WHERE datname = current_database() AND application_name LIKE 'cdcbackfill%' AND pid <> pg_backend_pid() ORDER BY pid`)
		if err != nil {
			t.Fatalf("list the daemon's sessions: %v", err)
		}
		bs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (backend, error) {
			var b backend
			return b, r.Scan(&b.pid, &b.app, &b.btype)
		})
		if err != nil {
			t.Fatalf("list the daemon's sessions: %v", err)
		}
		if !all && len(bs) > 0 {
			bs = bs[pick%len(bs) : pick%len(bs)+1]
		}
		var names []string
		for _, b := range bs {
			var ok bool
			if err := c.pool.QueryRow(ctx, `SELECT pg_terminate_backend($1)`, b.pid).Scan(&ok); err != nil {
				t.Fatalf("pg_terminate_backend(%d): %v", b.pid, err)
			}
			if ok {
				c.killed++
				names = append(names, fmt.Sprintf("%d %s/%s", b.pid, b.app, b.btype))
			}
		}
		which := "one of"
		if all {
			which = "all"
		}
		c.note("[%s] terminate: %s the daemon's sessions: %d ended [%s]", ph, which, len(names), strings.Join(names, ", "))

	case faultLock:
		hold, release := c.lock(ph)
		time.Sleep(hold)
		release()

	case faultStraggler:
		dur := 1500*time.Millisecond + time.Duration(c.rng.Int64N(int64(3*time.Second)))
		every := 100*time.Millisecond + time.Duration(c.rng.Int64N(int64(300*time.Millisecond)))
		if c.strag.start(c.rng.Uint64(), dur, every) {
			c.note("[%s] straggler: writes full_name only, every %s for %s", ph, every.Round(time.Millisecond), dur.Round(time.Millisecond))
		} else {
			c.note("[%s] straggler: already writing", ph)
		}

	case faultPause:
		hold := 500*time.Millisecond + time.Duration(c.rng.Int64N(int64(1500*time.Millisecond)))
		r := cli(t, 30*time.Second, nil, "pause", "--config", c.cfg)
		c.note("[%s] pause: for %s (exit %d)", ph, hold.Round(time.Millisecond), r.code)
		if r.code != 0 {
			// A migration that reached done in between cannot be paused.
			if p := phase(t, c.pool); p != "done" {
				t.Errorf("pause failed in phase %s\n%s", p, r)
			}
			return
		}
		time.Sleep(hold)
		if r := cli(t, 30*time.Second, nil, "resume", "--config", c.cfg); r.code != 0 {
			if p := phase(t, c.pool); p != "done" {
				t.Fatalf("resume failed in phase %s\n%s", p, r)
			}
		}
	}
}

// lock takes, on a session of its own, a lock on users that only DDL
// conflicts with, and returns how long to hold it and how to release it.
func (c *chaosRun) lock(ph string) (time.Duration, func()) {
	t := c.t
	hold := time.Second + time.Duration(c.rng.Int64N(int64(2*time.Second)))
	stmt := "SELECT count(*) FROM users" // ACCESS SHARE
	if c.rng.IntN(2) == 0 {
		stmt = "LOCK TABLE users IN SHARE UPDATE EXCLUSIVE MODE"
	}
	// Neither mode conflicts with the application's reads and writes; both
	// conflict with the daemon's DDL, and SHARE UPDATE EXCLUSIVE also with
	// CREATE PUBLICATION.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, withParam(c.dsn, "application_name=chaos-lock"))
	if err != nil {
		t.Fatalf("lock fault: connect: %v", err)
	}
	_, err = conn.Exec(ctx, "BEGIN")
	if err == nil {
		_, err = conn.Exec(ctx, stmt)
	}
	if err != nil {
		conn.Close(context.Background())
		c.note("[%s] lock: could not take it (%v)", ph, err)
		return 0, func() {}
	}
	c.note("[%s] lock: %q held for %s", ph, stmt, hold.Round(time.Millisecond))
	return hold, func() {
		// Closing the session ends the transaction and its lock.
		if err := conn.Close(context.Background()); err != nil {
			t.Errorf("lock fault: release: %v", err)
		}
	}
}

// postMortem logs what a failed iteration needs to be understood.
func (c *chaosRun) postMortem() {
	c.t.Logf("fault log:\n  %s", strings.Join(c.log, "\n  "))
	c.t.Logf("phases seen: %s", c.phases.path())
	for i, d := range c.daemons {
		c.t.Logf("daemon %d of %d, output ends:\n%s", i+1, len(c.daemons), tail(d.output(), 25))
	}
	c.t.Logf("status:\n%s", cli(c.t, 30*time.Second, nil, "status", "--config", c.cfg))
}

func tail(s string, lines int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > lines {
		ls = append([]string{fmt.Sprintf("[... %d lines]", len(ls)-lines)}, ls[len(ls)-lines:]...)
	}
	return strings.Join(ls, "\n")
}

func withParam(dsn, param string) string {
	if strings.Contains(dsn, "?") {
		return dsn + "&" + param
	}
	return dsn + "?" + param
}

func sampleDiffs(t *testing.T, pool *pgxpool.Pool) string {
	rows, err := pool.Query(context.Background(), `SELECT coalesce(u.id, e.id), u.id IS NOT NULL, e.id IS NOT NULL,
			coalesce(u.first_name, '<null>'), coalesce(u.last_name, '<null>'), coalesce(e.first_name, '<null>'), coalesce(e.last_name, '<null>')
		FROM users u FULL JOIN expected e USING (id)
		WHERE u.id IS NULL OR e.id IS NULL OR u.first_name IS DISTINCT FROM e.first_name OR u.last_name IS DISTINCT FROM e.last_name
		ORDER BY 1 LIMIT 10`)
	if err != nil {
		return err.Error()
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		var id int64
		var inUsers, inExpected bool
		var uf, ul, ef, el string
		if err := rows.Scan(&id, &inUsers, &inExpected, &uf, &ul, &ef, &el); err != nil {
			return err.Error()
		}
		fmt.Fprintf(&b, "  id %d: users(%v) %s %s; expected(%v) %s %s\n", id, inUsers, uf, ul, inExpected, ef, el)
	}
	return b.String()
}

func dropChaosOrigins(serverDSN string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, serverDSN)
	if err != nil {
		return
	}
	defer conn.Close(context.Background())
	_, _ = conn.Exec(ctx, `SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE starts_with(roname, 'cdcbackfill_split_full_name.')`)
}

// classify splits an application's failures into those a server restart
// explains (a lost connection, inside a restart window or just after it)
// and the rest.
func classify(failures []workload.Failure, windows []window) (inRestart int, other []workload.Failure) {
	for _, f := range failures {
		explained := false
		if dbconn.IsConnLoss(f.Err) {
			for _, w := range windows {
				if !f.At.Before(w.from) && !f.At.After(w.to.Add(restartGrace)) {
					explained = true
					break
				}
			}
		}
		if explained {
			inRestart++
		} else {
			other = append(other, f)
		}
	}
	return inRestart, other
}

// phaseWatch polls the phase, remembers the path taken, and switches the
// application to dual-write once the migration reaches sync (as TestFullStory
// does).
type phaseWatch struct {
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
	mu     sync.Mutex
	cur    string
	seen   []string
}

func watchPhases(pool *pgxpool.Pool, a *workload.App, begin time.Time) *phaseWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &phaseWatch{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for ctx.Err() == nil {
			qctx, qcancel := context.WithTimeout(ctx, 2*time.Second)
			var p string
			err := pool.QueryRow(qctx, `SELECT phase FROM cdcbackfill.migrations WHERE name = 'split_full_name'`).Scan(&p)
			qcancel()
			if err == nil {
				w.mu.Lock()
				if p != w.cur {
					w.cur = p
					w.seen = append(w.seen, fmt.Sprintf("%s(+%.1fs)", p, time.Since(begin).Seconds()))
				}
				w.mu.Unlock()
				switch p {
				case "sync", "verify", "contract", "done":
					a.Deploy(workload.WritesBoth)
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return w
}

func (w *phaseWatch) current() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cur
}

// saw records p as reached, for a phase the poll may have missed.
func (w *phaseWatch) saw(p string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cur != p {
		w.cur = p
		w.seen = append(w.seen, p)
	}
}

func (w *phaseWatch) path() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return strings.Join(w.seen, "→")
}

func (w *phaseWatch) stop() {
	w.once.Do(func() {
		w.cancel()
		<-w.done
	})
}

// straggler is an old-release writer (see the fault): one pinned writer
// of the application, renames only, for a bout at a time.
type straggler struct {
	pool  *pgxpool.Pool
	seed  uint64
	mu    sync.Mutex
	bouts []*workload.App
}

// start begins a bout of writes unless one runs; it reports whether it
// started one. The bout stops by itself after dur.
func (s *straggler) start(seed uint64, dur, every time.Duration) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := len(s.bouts); n > 0 && !s.bouts[n-1].Stopped() {
		return false
	}
	a := workload.Start(s.pool, workload.Options{Writers: 1, Pause: every, MaxID: chaosRows, Seed: seed,
		Mix: workload.Mix{Renames: 1}, Expected: "expected", Release: workload.WritesOld, Pinned: true})
	time.AfterFunc(dur, a.Stop)
	s.bouts = append(s.bouts, a)
	return true
}

func (s *straggler) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, a := range s.bouts {
		a.Stop()
	}
}

// writes and failures of every bout; a write that found full_name dropped
// is late: the migration contracted while the straggler still wrote.
func (s *straggler) writes() (writes, late int64, failures []workload.Failure) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, a := range s.bouts {
		total, failed := a.Transactions()
		writes += total - failed
		for _, f := range a.Failures() {
			var pgErr *pgconn.PgError
			if errors.As(f.Err, &pgErr) && pgErr.Code == "42703" {
				late++
			} else {
				failures = append(failures, f)
			}
		}
	}
	return writes, late, failures
}
