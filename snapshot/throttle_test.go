package snapshot_test

import (
	"context"
	"log/slog"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func exec(t *testing.T, conn *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := conn.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// backfill runs batches through th until the test ends, as the backfill
// workers do, and counts them.
func backfill(t *testing.T, th *snapshot.Throttle) *atomic.Int64 {
	ctx, cancel := context.WithCancel(context.Background())
	var batches atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for th.Wait(ctx, 1) == nil {
			batches.Add(1)
			if ctx.Err() != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return &batches
}

// waitUntil polls cond, writing WAL on the primary each round (a standby
// reports its positions when WAL arrives), until it holds or the deadline.
func waitUntil(t *testing.T, what string, primary *pgx.Conn, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		exec(t, primary, "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20)")
	}
}

// A standby that stops replaying, or stops altogether, holds the backfill:
// in bytes behind (replay_lag goes stale exactly then), and as a slot
// nobody reads that keeps WAL; it resumes once the standby is back and
// caught up. An ignored slot holds nothing.
func TestThrottleHoldsForStandby(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	primary := connect(t, dsn)
	exec(t, primary, "CREATE TABLE filler (x text)")
	sb := pgtest.StartStandby(t, "replica1")
	standby := connect(t, sb.DSN())

	cfg := snapshot.ThrottleConfig{MaxReplicaLag: time.Minute, MaxReplicaLagBytes: 1 << 20, CheckEvery: 50 * time.Millisecond}
	th := snapshot.NewThrottle(cfg, connect(t, dsn), nil)
	batches := backfill(t, th)
	progressing := func() bool {
		n := batches.Load()
		return th.Reason() == "" && batches.Load() > n+10
	}
	waitUntil(t, "the backfill to run with the standby caught up", primary, progressing)

	// (a) Replay paused: received, not replayed.
	exec(t, standby, "SELECT pg_wal_replay_pause()")
	exec(t, primary, "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)")
	waitUntil(t, "the throttle to hold on replay lag", primary, func() bool { return strings.Contains(th.Reason(), "throttle.max_replica_lag_bytes") })
	if r := th.Reason(); !regexp.MustCompile(`^standby "replica1" replays \d+ (kB|MB) behind > throttle.max_replica_lag_bytes 1024 kB`).MatchString(r) {
		t.Errorf("reason while replay is paused: %q", r)
	}
	held := batches.Load()
	exec(t, standby, "SELECT pg_wal_replay_resume()")
	waitUntil(t, "the backfill to resume after replay caught up", primary, progressing)
	if batches.Load() == held {
		t.Error("no batch ran after the standby caught up")
	}

	// (b) The standby stops: its slot keeps WAL for it.
	if err := sb.Stop(); err != nil {
		t.Fatal(err)
	}
	disconnected := regexp.MustCompile(`^standby slot "replica1" is not connected and holds (\d+) (bytes|kB|MB) of WAL; .*throttle\.ignore_slots`)
	waitUntil(t, "the throttle to hold on the disconnected standby", primary, func() bool { return disconnected.MatchString(th.Reason()) })
	// The application writes on while it is down: the slot keeps that WAL,
	// and the reason says how much.
	exec(t, primary, "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 1000)")
	waitUntil(t, "the reason to name the WAL the slot keeps", primary, func() bool {
		m := disconnected.FindStringSubmatch(th.Reason())
		return m != nil && m[1] != "0"
	})
	held = batches.Load()
	ignoring := cfg
	ignoring.IgnoreSlots = []string{"replica1"}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := snapshot.NewThrottle(ignoring, connect(t, dsn), nil).Wait(ctx, 1); err != nil {
		t.Errorf("a throttle ignoring slot replica1 held: %v", err)
	}
	if n := batches.Load(); n > held+1 { // one batch may have passed the check in flight
		t.Errorf("%d batches ran while the standby was down", n-held)
	}

	// (c) Back, and caught up: the backfill goes on.
	if err := sb.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the backfill to resume after the standby came back", primary, progressing)
}

// The throttle logs by the kind of its reason: one line when it starts
// holding (with the figure), none while only the figure moves, one when it
// releases (with how long).
func TestThrottleLogsOncePerHold(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	primary := connect(t, dsn)
	exec(t, primary, "CREATE TABLE filler (x text)")
	exec(t, primary, "SELECT pg_create_logical_replication_slot('throttle_log', 'pgoutput')")

	var logs pgtest.LogBuffer
	th := snapshot.NewThrottle(snapshot.ThrottleConfig{
		MaxSlotLag: 64 << 10, Slot: "throttle_log", CheckEvery: 50 * time.Millisecond,
		Name: "backfill", Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	}, connect(t, dsn), nil)
	backfill(t, th)

	// The slot's lag grows with every write: the same reason, a new figure.
	figures := map[string]bool{}
	waitUntil(t, "five figures of the slot's lag", primary, func() bool {
		if r := th.Reason(); strings.HasPrefix(r, "slot lag ") {
			figures[r] = true
		}
		return len(figures) >= 5
	})
	if got := logs.Lines("backfill: throttled: batches wait"); len(got) != 1 || !strings.Contains(got[0], "reason=\"slot lag ") {
		t.Errorf("want one throttled line with the figure, got %d:\n%s", len(got), logs.String())
	}

	// As a reader of the slot would, confirm all there is, as it comes.
	waitUntil(t, "the throttle to release", primary, func() bool {
		exec(t, primary, "SELECT pg_replication_slot_advance('throttle_log', pg_current_wal_lsn())")
		return th.Reason() == ""
	})
	exec(t, primary, "SELECT pg_drop_replication_slot('throttle_log')")
	// The hold is two lines, whatever its figures. The test's own writes
	// may start another hold after the release, before the slot is gone:
	// its lines come after these two.
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if len(lines) < 2 || !strings.Contains(lines[0], "backfill: throttled: batches wait") ||
		!strings.Contains(lines[1], "backfill: throttle released") || !regexp.MustCompile(`after=[0-9.]+m?s`).MatchString(lines[1]) {
		t.Errorf("want a hold with %d figures logged as one throttled line, then one released line with a duration:\n%s", len(figures), logs.String())
	}
	// Any later hold is logged the same way: throttled and released lines
	// alternate.
	for i, l := range lines {
		want := "backfill: throttled: batches wait"
		if i%2 == 1 {
			want = "backfill: throttle released"
		}
		if !strings.Contains(l, want) {
			t.Errorf("line %d: want %q (throttled and released lines alternate):\n%s", i+1, want, logs.String())
			break
		}
	}
}
