// Package bench measures cdcbackfill against its baselines in one run and
// prints a table of ratios (make bench). Figures are for the machine they
// run on; the ratios are what to compare across machines.
package bench

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/phases"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// backfillRows is the table's size: 200k rows, or 20k with -short, the
// smoke run of make test-matrix (the daemon on each server version, not a
// measure).
func backfillRows() int {
	if testing.Short() {
		return 20000
	}
	return 200000
}

func seedDB(b *testing.B) string {
	dsn := pgtest.NewDatabase(b)
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(context.Background())
	for _, sql := range []string{
		`CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text)`,
		fmt.Sprintf(`INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'u' || g || '@example.com' FROM generate_series(1, %d) g`, backfillRows()),
		`VACUUM ANALYZE users`,
		// Both ways leave 200k dead row versions for vacuum. Autovacuum is
		// kept off this table so neither pays for it inside its time (the
		// single UPDATE cannot; the backfill could, halfway) and no run's
		// leftovers are vacuumed during the next one.
		`ALTER TABLE users SET (autovacuum_enabled = off)`,
		`ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text`,
		`CHECKPOINT`,
	} {
		if _, err := conn.Exec(context.Background(), sql); err != nil {
			b.Fatal(err)
		}
	}
	return dsn
}

// batchTimes collects the duration of each backfill batch from the
// daemon's debug log.
type batchTimes struct {
	mu    sync.Mutex
	times []time.Duration
}

func (bt *batchTimes) Enabled(context.Context, slog.Level) bool { return true }
func (bt *batchTimes) WithAttrs([]slog.Attr) slog.Handler       { return bt }
func (bt *batchTimes) WithGroup(string) slog.Handler            { return bt }
func (bt *batchTimes) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "backfill batch" {
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "took" {
			bt.mu.Lock()
			bt.times = append(bt.times, a.Value.Duration())
			bt.mu.Unlock()
		}
		return true
	})
	return nil
}

func (bt *batchTimes) quantile(q float64) time.Duration {
	bt.mu.Lock()
	defer bt.mu.Unlock()
	if len(bt.times) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), bt.times...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(int(q*float64(len(s))), len(s)-1)]
}

// BenchmarkBackfill compares the backfill at default settings (throttling
// off) with one UPDATE of the whole table on the same data. Each is run
// three times, alternating, on fresh copies of the data; the medians are
// compared, so a passing disturbance on this shared machine does not decide
// the ratio.
func BenchmarkBackfill(b *testing.B) {
	runs := 3
	if testing.Short() {
		runs = 1
	}
	benchRows := backfillRows()
	var singles, backfills []time.Duration
	bt := &batchTimes{}
	for i := 0; i < runs; i++ {
		singles = append(singles, singleUpdate(b))
		backfills = append(backfills, daemonBackfill(b, bt))
	}
	single, took := median(singles), median(backfills)
	singleRate := float64(benchRows) / single.Seconds()
	rate := float64(benchRows) / took.Seconds()
	w := os.Stdout
	fmt.Fprintf(w, "\nbackfill, %d rows, median of %d runs each, autovacuum off on the table for both (target: ratio >= 0.70; batch p99 < target_batch_time %s)\n", benchRows, runs, config.Default().Backfill.TargetBatchTime)
	fmt.Fprintf(w, "%-34s %12s %12s %8s   %s\n", "", "seconds", "rows/s", "ratio", "all runs")
	fmt.Fprintf(w, "%-34s %12.2f %12.0f %8.2f   %v\n", "single UPDATE (baseline)", single.Seconds(), singleRate, 1.0, rounded(singles))
	fmt.Fprintf(w, "%-34s %12.2f %12.0f %8.2f   %v\n", "cdcbackfill backfill (defaults)", took.Seconds(), rate, rate/singleRate, rounded(backfills))
	fmt.Fprintf(w, "batch time (row locks held): p50 %s, p99 %s, max %s over %d batches\n",
		bt.quantile(0.5).Round(time.Millisecond), bt.quantile(0.99).Round(time.Millisecond), bt.quantile(1).Round(time.Millisecond), len(bt.times))
	b.ReportMetric(rate/singleRate, "ratio")
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func rounded(d []time.Duration) []time.Duration {
	out := make([]time.Duration, len(d))
	for i, v := range d {
		out[i] = v.Round(10 * time.Millisecond)
	}
	return out
}

// singleUpdate times the locking way: one UPDATE of every row.
func singleUpdate(b *testing.B) time.Duration {
	dsn := seedDB(b)
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(context.Background())
	start := time.Now()
	if _, err := conn.Exec(context.Background(), `UPDATE users SET first_name = split_part(full_name, ' ', 1), last_name = split_part(full_name, ' ', 2)`); err != nil {
		b.Fatal(err)
	}
	return time.Since(start)
}

// daemonBackfill runs the daemon at its defaults, throttles off, and times
// the backfill from the slot's creation to phase sync.
func daemonBackfill(b *testing.B, bt *batchTimes) time.Duration {
	dsn := seedDB(b)
	cfg := config.Default()
	cfg.Name = "bench"
	cfg.Database.DSN = dsn
	cfg.Table = "public.users"
	cfg.Columns = []config.Column{{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"}, {Name: "last_name", Expr: "split_part(full_name, ' ', 2)"}}
	cfg.Throttle.MaxReplicaLag, cfg.Throttle.MaxSlotLag = 0, 0
	cfg.HTTP.Listen = ""
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- phases.Run(ctx, cfg, slog.New(bt)) }()
	var took time.Duration
	poll(b, dsn, nil, 10*time.Minute, "the backfill to reach phase sync", func(ctx context.Context, conn *pgx.Conn) (bool, string) {
		select {
		case err := <-runErr:
			b.Fatalf("daemon stopped before phase sync: %v", err)
		default:
		}
		var ph string
		var secs *float64
		err := conn.QueryRow(ctx, `SELECT m.phase, (SELECT extract(epoch FROM max(e.at) FILTER (WHERE e.phase = 'sync') - max(e.at) FILTER (WHERE e.phase = 'backfill' AND e.kind = 'slot')))::float8
			FROM cdcbackfill.migrations m LEFT JOIN cdcbackfill.events e ON e.name = m.name GROUP BY m.phase`).Scan(&ph, &secs)
		if err == nil && ph == "sync" && secs != nil {
			took = time.Duration(*secs * float64(time.Second))
			return true, ""
		}
		return false, fmt.Sprintf("phase %q, %v", ph, err)
	})
	cancel()
	if err := <-runErr; err != nil {
		b.Fatal(err)
	}
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(context.Background())
	var bad int64
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM users WHERE (first_name, last_name) IS DISTINCT FROM (split_part(full_name, ' ', 1), split_part(full_name, ' ', 2))`).Scan(&bad); err != nil || bad != 0 {
		b.Fatalf("parity after backfill: %d rows differ (%v)", bad, err)
	}
	// The next run's seeding should not compete with this run's leftovers.
	if _, err := conn.Exec(context.Background(), `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = current_database()`); err != nil {
		b.Fatal(err)
	}
	return took
}
