package snapshot_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// The sizer aims at 2/3 of the target from the slowest of the last few
// batches: one fast batch after a slow one does not bring back the size
// the fast ones allowed, which would overshoot the target with the next
// slow one; it grows again once the slow batch has left the window.
func TestSizerSizesFromTheSlowestRecentBatch(t *testing.T) {
	const target = 300 * time.Millisecond
	s := snapshot.NewSizer(1000, target)
	// 1000 rows in 100ms: 100µs a row, 2000 rows fit 200ms (2/3 of 300ms).
	if got := s.Observe(100 * time.Millisecond); got != 2000 {
		t.Fatalf("after a 100µs/row batch of 1000: size %d, want 2000", got)
	}
	if got := s.Observe(200 * time.Millisecond); got != 2000 {
		t.Fatalf("at the aim: size %d, want 2000", got)
	}
	// A slow batch (300µs a row): down at once to what fits the aim.
	if got := s.Observe(600 * time.Millisecond); got != 666 {
		t.Fatalf("after a batch 3x slower per row: size %d, want 666", got)
	}
	// Fast again (100µs a row), but the slow one is in the window: the
	// size stays where 300µs a row fits the aim.
	if got := s.Observe(666 * 100 * time.Microsecond); got != 666 {
		t.Fatalf("a fast batch right after a slow one: size %d, want 666", got)
	}
	for range 3 {
		s.Observe(time.Duration(s.Size()) * 100 * time.Microsecond)
	}
	if got := s.Size(); got != 666 {
		t.Fatalf("4 batches after the slow one: size %d, want 666", got)
	}
	// The fifth fast batch pushes the slow one out: up again (at most 4x).
	if got := s.Observe(time.Duration(s.Size()) * 100 * time.Microsecond); got != 2000 {
		t.Fatalf("the slow batch out of the window: size %d, want 2000", got)
	}

	fixed := snapshot.NewSizer(5000, 0)
	if got := fixed.Observe(time.Hour); got != 5000 {
		t.Fatalf("target 0: size %d, want it kept at 5000", got)
	}
}

// A real backfill whose cost per row changes along the key range (stripes
// of rows whose expression hashes a long text, between cheap ones) keeps
// its batches within target_batch_time: the sizer does not grow back to
// the cheap rows' size between two stripes.
func TestBackfillBatchesStayWithinTarget(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	conn := connect(t, dsn)
	exec(t, conn, `CREATE TABLE work (id bigint PRIMARY KEY, n int, src text, dst text)`)
	// Stripes of 2000 costly rows (n = 1000, ten times the cost per row)
	// every 8000: about one batch's worth at the costly rows' size.
	exec(t, conn, `INSERT INTO work SELECT g, CASE WHEN (g / 2000) % 4 = 1 THEN 1000 ELSE 1 END, 'row ' || g, NULL FROM generate_series(1, 200000) g`)
	exec(t, conn, `VACUUM ANALYZE work`)
	tb, err := recompute.Inspect(ctx, conn, "public", "work", []recompute.Column{{Name: "dst", Expr: "md5(repeat(src, n))"}})
	if err != nil {
		t.Fatal(err)
	}
	var logs pgtest.LogBuffer
	const target = 100 * time.Millisecond
	b := &snapshot.Backfiller{
		Table: tb, BatchSize: 1000, TargetBatchTime: target,
		Throttle:   snapshot.NewThrottle(snapshot.ThrottleConfig{}, connect(t, dsn), nil),
		Checkpoint: func(context.Context, pgx.Tx, int, snapshot.Range, recompute.Result) error { return nil },
		Log:        slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if err := b.Run(ctx, []*pgx.Conn{connect(t, dsn)}, []snapshot.Range{{Hi: recompute.Key{"200000"}}}); err != nil {
		t.Fatal(err)
	}
	var bad int64
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM work WHERE dst IS DISTINCT FROM md5(repeat(src, n))`).Scan(&bad); err != nil || bad != 0 {
		t.Fatalf("after the backfill: %d rows out of parity (%v)", bad, err)
	}
	var took []time.Duration
	var sizes []int
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var rec struct {
			Msg  string `json:"msg"`
			Rows int    `json:"rows"`
			Took int64  `json:"took"`
		}
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "backfill batch" {
			took = append(took, time.Duration(rec.Took))
			sizes = append(sizes, rec.Rows)
		}
	}
	if len(took) < 10 {
		t.Fatalf("only %d batches: the table is too small to see the sizer at work\n%s", len(took), logs.String())
	}
	// Overshoot is counted from 1.5x the target: the sizer aims at 2/3 of
	// it, so beyond that it sized wrongly, where up to it the machine was
	// busy (under make test's parallel packages, 7 of 112 batches took
	// 1.0-1.4x; sized from the last batch alone, 5 of 34 take 1.5-2.2x).
	var over []time.Duration
	for _, d := range took {
		if d >= target*3/2 {
			over = append(over, d.Round(time.Millisecond))
		}
	}
	t.Logf("%d batches, sizes %v; %d at 1.5x target %s or more: %v", len(took), sizes, len(over), target, over)
	// The first stripe meets a size fitted to cheap rows (and the batch
	// after it, fitted to a batch only partly in the stripe); after that,
	// a stripe is never more than sizerWindow batches away, and none may
	// overshoot.
	if len(over) > 2 {
		t.Errorf("%d batches took 1.5x target_batch_time %s or more: %v", len(over), target, over)
	}
}
