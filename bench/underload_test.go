package bench

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// BenchmarkBackfillUnderLoad measures what backfill.sleep, the pause after
// every batch, buys the application: pgbench writes full_name of random
// rows at a fixed rate (-R, so a stall delays every transaction queued
// behind it) while the daemon backfills a fresh copy of a frozen, warm
// table, with the default 10ms and with 0s; and, as the baseline, the same
// load with no migration. The application's latency is counted over the
// backfill's window only (the transactions that ended between the slot's
// creation and phase sync), after an unmeasured warm-up of the same load.
// Setups alternate, the median of the rounds is printed; the benchmark's
// server has production durability.
func BenchmarkBackfillUnderLoad(b *testing.B) {
	rows, loadTime := 500_000, 12*time.Second
	if testing.Short() {
		rows, loadTime = 100_000, 5*time.Second
	}
	rounds := readBackfillEnv(b).runs // BENCH_RUNS, 3 (1 with -short)
	pgbenchPath := findPgbench(b)
	if pgbenchPath == "" {
		b.Skip("no pgbench: install PostgreSQL's client programs")
	}
	bin := daemonBinary(b)
	tmpl, _ := backfillTemplate(b, rows)
	const rate = 500 // transactions a second: light, so a stall shows in latency, not in a queue that never drains

	sleep10, sleep0 := 10*time.Millisecond, time.Duration(0)
	setups := []struct {
		name  string
		sleep *time.Duration // nil: no migration
	}{{"no migration", nil}, {"backfill, sleep 10ms", &sleep10}, {"backfill, sleep 0s", &sleep0}}
	results := make([][]underLoad, len(setups))
	for round := range rounds {
		for i, s := range setups {
			results[i] = append(results[i], backfillUnderLoad(b, bin, pgbenchPath, tmpl, rows, rate, loadTime, s.sleep, fmt.Sprintf("underload_%d_%d", round, i)))
		}
	}

	w := os.Stdout
	fmt.Fprintf(w, "\n== backfill under load: %d rows, pgbench at %d tx/s (4 clients, -R) updating full_name of random rows, median of %d rounds\n", rows, rate, rounds)
	fmt.Fprintf(w, "%-22s %11s %9s %9s %9s %9s %9s   %s\n", "setup", "backfill s", "app txns", "p50 ms", "p99 ms", "max ms", "p99 ratio", "p50/p99 of each round, ms")
	var baseP99 float64
	for i, s := range setups {
		m := medianUnderLoad(results[i])
		if i == 0 {
			baseP99 = m.p99
		}
		var each []string
		for _, r := range results[i] {
			each = append(each, fmt.Sprintf("%.1f/%.0f", r.p50, r.p99))
		}
		took := "-"
		if s.sleep != nil {
			took = fmt.Sprintf("%.2f", m.took.Seconds())
		}
		fmt.Fprintf(w, "%-22s %11s %9d %9.2f %9.2f %9.1f %9.2f   %v\n", s.name, took, m.txns, m.p50, m.p99, m.max, m.p99/baseP99, each)
	}
	fmt.Fprintf(w, "(no migration: the latencies of the whole run; a backfill: those of the transactions that ended during it;\n"+
		" txns, p50 and max are the round's with the median p99; backfill s is the median of its rounds)\n")
	b.ReportMetric(medianUnderLoad(results[1]).p99/baseP99, "p99-ratio-sleep10ms")
	b.ReportMetric(medianUnderLoad(results[2]).p99/baseP99, "p99-ratio-sleep0s")
}

// underLoad is one run of BenchmarkBackfillUnderLoad.
type underLoad struct {
	took          time.Duration // the backfill's, from the slot to phase sync
	txns          int           // the application's transactions counted
	p50, p99, max float64       // their latency, ms
}

func medianUnderLoad(rs []underLoad) underLoad {
	sorted := slices.Clone(rs)
	slices.SortFunc(sorted, func(x, y underLoad) int { return cmp.Compare(x.p99, y.p99) })
	m := sorted[len(sorted)/2]
	tooks := make([]time.Duration, len(rs))
	for i, r := range rs {
		tooks[i] = r.took
	}
	slices.Sort(tooks)
	m.took = tooks[len(tooks)/2]
	return m
}

// backfillUnderLoad runs pgbench at rate on a fresh copy of tmpl for
// loadTime, with the daemon backfilling it alongside when sleep is set.
func backfillUnderLoad(b *testing.B, bin, pgbenchPath, tmpl string, rows, rate int, loadTime time.Duration, sleep *time.Duration, name string) underLoad {
	b.Helper()
	dsn, drop := copyOf(b, tmpl, backfillEnv{})
	defer drop()
	p := newPgbench(b, pgbenchPath, dsn, rows)
	// Unmeasured, as BenchmarkSync's: the first writes after the copy's
	// checkpoint pay for full-page images and cold backends.
	p.run(b, float64(rate), warmupTime, false, nil)
	if sleep == nil {
		r := p.run(b, float64(rate), loadTime, true, nil)
		return underLoadOf(r.latencies, 0)
	}
	d := newDaemon(b, bin, dsn, name, daemonOptions{expanded: true, sleep: sleep})
	loadStart := time.Now()
	r := p.run(b, float64(rate), loadTime, true, d.pid)
	loadEnd := loadStart.Add(r.wall)
	var from, to time.Time
	poll(b, dsn, d, 5*time.Minute, "the backfill to reach phase sync", func(ctx context.Context, conn *pgx.Conn) (bool, string) {
		var ph string
		var start, end *time.Time
		err := conn.QueryRow(ctx, `SELECT m.phase, max(e.at) FILTER (WHERE e.phase = 'backfill' AND e.kind = 'slot'), min(e.at) FILTER (WHERE e.phase = 'sync')
			FROM cdcbackfill.migrations m LEFT JOIN cdcbackfill.events e ON e.name = m.name GROUP BY m.phase`).Scan(&ph, &start, &end)
		if err == nil && ph == "sync" && start != nil && end != nil {
			from, to = *start, *end
			return true, ""
		}
		switch {
		case err != nil:
			return false, err.Error()
		case start == nil:
			return false, fmt.Sprintf("phase %q, no slot event yet", ph)
		default:
			return false, fmt.Sprintf("phase %q, no sync event yet", ph)
		}
	})
	d.stop(b)
	d.abort(b)
	if from.Before(loadStart) || to.After(loadEnd) {
		b.Fatalf("the backfill (%s to %s) was not inside pgbench's load (%s to %s): part of it ran unloaded; raise loadTime",
			from.Format(time.TimeOnly), to.Format(time.TimeOnly), loadStart.Format(time.TimeOnly), loadEnd.Format(time.TimeOnly))
	}
	var lat []float64
	for _, f := range r.txLogs {
		l, err := readTxLogWindow(f, from, to)
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, l...)
	}
	if len(lat) == 0 {
		b.Fatalf("no application transaction ended during the backfill (%s): pgbench's log has none in its window", to.Sub(from))
	}
	slices.Sort(lat)
	return underLoadOf(lat, to.Sub(from))
}

func underLoadOf(sorted []float64, took time.Duration) underLoad {
	u := underLoad{took: took, txns: len(sorted), p50: pctl(sorted, 0.5), p99: pctl(sorted, 0.99)}
	if len(sorted) > 0 {
		u.max = sorted[len(sorted)-1]
	}
	return u
}
