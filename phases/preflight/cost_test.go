package preflight

import (
	"context"
	"testing"
	"time"

	"github.com/cdcbackfill/cdcbackfill/config"
)

func TestCheckCost(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkCost)
	has(t, in.r, Info, "of WAL over about 1 s at ")
	has(t, in.r, Info, "rows/s; the slot holds at most 1.0 GB (throttle.max_slot_lag)")
	has(t, in.r, Info, "10 rows x ")
	has(t, in.r, Info, "pace: uncapped, from a read-only sample of 10 rows in key order")
	has(t, in.r, Info, "no physical standby must receive it")
	noFail(t, in.r)
}

// A cap on the pace is the pace plan assumes; no cap on the slot says the
// slot may keep all of the backfill's WAL.
func TestCheckCostCapped(t *testing.T) {
	in := inspect(t, usersTable, func(c *config.Config) {
		c.Backfill.MaxRowsPerSecond = 2
		c.Throttle.MaxSlotLag = 0
	})
	run(t, in, checkCost)
	has(t, in.r, Info, "over about 5 s at 2 rows/s; the slot may hold all of it")
	has(t, in.r, Info, "pace: backfill.max_rows_per_second")
}

func TestEstimateGrowsWithTheTable(t *testing.T) {
	small := inspect(t, "CREATE TABLE users (id bigint PRIMARY KEY, full_name text); INSERT INTO users SELECT g, 'Ann Lee' FROM generate_series(1, 1000) g; ANALYZE users", nil)
	run(t, small, checkTable)
	big := inspect(t, "CREATE TABLE users (id bigint PRIMARY KEY, full_name text); INSERT INTO users SELECT g, 'Ann Lee' FROM generate_series(1, 10000) g; ANALYZE users", nil)
	run(t, big, checkTable)
	ctx := context.Background()
	a, err := EstimateBackfillCost(ctx, small.conn, small.cfg, small.table)
	if err != nil {
		t.Fatal(err)
	}
	b, err := EstimateBackfillCost(ctx, big.conn, big.cfg, big.table)
	if err != nil {
		t.Fatal(err)
	}
	if a.RowBytes != b.RowBytes {
		t.Errorf("WAL per row: %d at 1k rows, %d at 10k; the same rows should cost the same", a.RowBytes, b.RowBytes)
	}
	if ratio := float64(b.WALBytes) / float64(a.WALBytes); ratio < 8 || ratio > 12 {
		t.Errorf("10k rows cost %.1fx 1k rows in WAL; want about 10x: the cost should grow with the table, no faster", ratio)
	}
}

// The uncapped pace comes from the table and its expressions: a costlier
// expression over the same rows gives a slower pace.
func TestPaceFollowsTheExpressions(t *testing.T) {
	const setup = "CREATE TABLE users (id bigint PRIMARY KEY, full_name text); INSERT INTO users SELECT g, 'Ann Lee ' || g FROM generate_series(1, 30000) g; ANALYZE users"
	ctx := context.Background()
	pace := func(expr string) BackfillCost {
		in := inspect(t, setup, func(c *config.Config) { c.Columns[0].Expr = expr })
		c, err := EstimateBackfillCost(ctx, in.conn, in.cfg, in.table)
		if err != nil {
			t.Fatal(err)
		}
		if c.SampleRows != samplePaceRows || c.SampleRead <= 0 {
			t.Fatalf("sample of %d rows, %s a row: want %d rows read", c.SampleRows, c.SampleRead, samplePaceRows)
		}
		return c
	}
	cheap := pace("split_part(full_name, ' ', 1)")
	dear := pace("md5(repeat(full_name, 500))")
	t.Logf("split_part: %.0f rows/s (%s); md5: %.0f rows/s (%s)", cheap.RowsPerSecond, cheap.Pace, dear.RowsPerSecond, dear.Pace)
	if dear.SampleExprs < 10*cheap.SampleExprs || dear.RowsPerSecond > cheap.RowsPerSecond/2 {
		t.Errorf("md5 of a 6 kB string: %s a row, %.0f rows/s; split_part: %s a row, %.0f rows/s; want the dear one sampled costlier and paced at most half as fast",
			dear.SampleExprs, dear.RowsPerSecond, cheap.SampleExprs, cheap.RowsPerSecond)
	}
}

func TestCostText(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{sizeText(4617089843), "4.3 GB"},
		{sizeText(512 << 20), "512 MB"},
		{sizeText(900), "900 bytes"},
		{durationText(80 * time.Minute), "1 h 20 m"},
		{durationText(200 * time.Millisecond), "1 s"},
		{rateText(40000), "40k"},
		{rateText(1.25e6), "1.2M"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}
