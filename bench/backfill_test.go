// Package bench measures what a migration costs the database, against
// its alternatives, in one run (make bench), on a server with production
// durability. Each benchmark prints one table per target with PASS or FAIL.
// Figures are for the machine they run on; the ratios are what to compare
// across machines.
package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/phases/preflight"
)

// backfillSizes are the table sizes of one run: BENCH_ROWS, a comma list
// (make bench-long: 1000000,10000000, so the ratios sit side by side);
// 1M rows by default, or 20k with -short, the smoke run of make
// test-matrix (the daemon on each server version, not a measure).
func backfillSizes(b *testing.B) []int {
	b.Helper()
	if v := os.Getenv("BENCH_ROWS"); v != "" {
		var out []int
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n <= 0 {
				b.Fatalf("BENCH_ROWS=%q: want a comma list of row counts", v)
			}
			out = append(out, n)
		}
		return out
	}
	if testing.Short() {
		return []int{20000}
	}
	return []int{1000000}
}

// backfillEnv are the levers of BenchmarkBackfill, from the environment.
type backfillEnv struct {
	runs       int           // BENCH_RUNS: repetitions, the median is compared (3; 1 with -short)
	autovacuum bool          // BENCH_AUTOVACUUM=1: the table's autovacuum on during the runs (off by default, for both methods)
	sleep      time.Duration // BENCH_SLEEP: backfill.sleep; -1 keeps the config's default
}

func readBackfillEnv(b *testing.B) backfillEnv {
	b.Helper()
	e := backfillEnv{runs: 3, sleep: -1}
	if testing.Short() {
		e.runs = 1
	}
	if v := os.Getenv("BENCH_RUNS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("BENCH_RUNS=%q: want a number >= 1", v)
		}
		e.runs = n
	}
	switch v := os.Getenv("BENCH_AUTOVACUUM"); v {
	case "", "0":
	case "1":
		e.autovacuum = true
	default:
		b.Fatalf("BENCH_AUTOVACUUM=%q: want 0 or 1", v)
	}
	if v := os.Getenv("BENCH_SLEEP"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			b.Fatalf("BENCH_SLEEP=%q: want a duration such as 10ms or 0s", v)
		}
		e.sleep = d
	}
	return e
}

// backfillVariant is a way of filling the new columns: the single UPDATE
// (o.workers 0) or the daemon with options o.
type backfillVariant struct {
	name string
	o    daemonOptions
}

// backfillRun is one way of filling the new columns of a fresh copy.
type backfillRun struct {
	took    time.Duration
	wal     int64 // bytes of WAL written meanwhile
	roles   roleCPU
	sys     roleCPU         // of roles, the kernel's
	batches []time.Duration // the daemon's, from its log
	commits []time.Duration // of each batch, its COMMIT's share
	rss     int64           // the daemon's peak RSS (VmHWM), bytes

	checkpoints int64 // started during the run
	fpi         int64 // full-page images written during the run (pg_stat_wal)

	// The VACUUM the method leaves to do, run and timed after it: how long,
	// and the dead tuples it removed.
	vacuum time.Duration
	dead   int64

	estimate preflight.BackfillCost // plan's, before the run (daemon only)
}

// withVacuum is the method's time and its VACUUM's.
func (r backfillRun) withVacuum() time.Duration { return r.took + r.vacuum }

// sizeResult is what one table size gave, for the summary.
type sizeResult struct {
	rows        int
	ratio       float64 // rows/s of the daemon (workers 1) to the UPDATE's, medians
	walRatio    float64
	p99         time.Duration
	batches     int
	rss         int64
	vacRatio    float64 // the same ratio with each method's VACUUM counted
	estWAL      float64 // plan's estimate / measured
	estTime     float64
	hasEstimate bool
}

// BenchmarkBackfill compares the backfill (throttling off) with one UPDATE
// of the whole table, on fresh copies of the same frozen table, warmed into
// shared buffers (as much as fits), autovacuum off on it for both by
// default (the single UPDATE cannot pay for vacuum inside its time; the
// backfill could, halfway): each method's VACUUM is run and timed after it
// instead, so the comparison that counts, UPDATE + VACUUM against backfill
// + VACUUM, is printed too. The runs alternate and the medians are
// compared, so a passing disturbance on this shared machine does not
// decide the ratio. Beside the time: the WAL each wrote against plan's
// estimate, checkpoints and full-page images, and where the CPU went. At
// each size of BENCH_ROWS; then one summary with the targets.
func BenchmarkBackfill(b *testing.B) {
	env := readBackfillEnv(b)
	bin := daemonBinary(b)
	srv := pgtest.Shared(b)
	w := os.Stdout
	fmt.Fprintf(w, "\n%s\n", serverLine(b))
	var sizes []sizeResult
	for _, rows := range backfillSizes(b) {
		sizes = append(sizes, backfillSize(b, bin, rows, env))
	}
	printBackfillSummary(b, w, srv.Major(), sizes)
	b.ReportMetric(sizes[len(sizes)-1].ratio, "ratio")
}

// backfillTarget is the rows/s ratio the backfill must reach: at 10M rows
// 0.8 on 15 and 0.85 on 16+; below, 0.7 on 15 and 0.9 on 16+.
func backfillTarget(major, rows int) float64 {
	switch {
	case rows >= 10000000 && major < 16:
		return 0.8
	case rows >= 10000000:
		return 0.85
	case major < 16:
		return 0.7
	}
	return 0.9
}

// backfillSize measures one table size and prints its tables.
func backfillSize(b *testing.B, bin string, rows int, env backfillEnv) sizeResult {
	srv := pgtest.Shared(b)
	tmpl, dropTmpl := backfillTemplate(b, rows)
	defer dropTmpl()
	o := func(workers int, filter string) daemonOptions {
		opts := daemonOptions{expanded: true, workers: workers, originFilter: filter, debugJSON: true, throttleOff: true}
		if env.sleep >= 0 {
			opts.sleep = &env.sleep
		}
		return opts
	}
	variants := []backfillVariant{
		{name: "single UPDATE (baseline)"},
		{name: "cdcbackfill, workers 1", o: o(1, "")},
		{name: "cdcbackfill, workers 2", o: o(2, "")},
	}
	// sync.origin_filter: the walsender drops the daemon's own writes
	// (auto, 16+) or sends them for the daemon to skip (client).
	originNote := ""
	switch {
	case !hasConfigKey(reflect.TypeFor[config.Config](), "sync.origin_filter"):
		originNote = "sync.origin_filter: not in this build's config; the client-side variant is skipped"
	case srv.Major() < 16:
		originNote = fmt.Sprintf("sync.origin_filter: on PostgreSQL %d auto is client (no server-side origin filter before 16); not run twice", srv.Major())
	default:
		variants = append(variants, backfillVariant{name: "cdcbackfill, workers 1, client", o: o(1, "client")})
		variants[1].name += ", auto"
	}

	results := make([][]backfillRun, len(variants))
	for i := range env.runs {
		for v, variant := range variants {
			var r backfillRun
			if variant.o.workers == 0 {
				r = singleUpdate(b, tmpl, env)
			} else {
				r = daemonBackfill(b, bin, tmpl, variant.o, fmt.Sprintf("bf%d_%d", v, i), env)
			}
			results[v] = append(results[v], r)
		}
	}

	// Table: rows/s, WAL, batches, the daemon's memory.
	w := os.Stdout
	target := backfillTarget(srv.Major(), rows)
	tbt := config.Default().Backfill.TargetBatchTime
	sleep := config.Default().Backfill.Sleep
	if env.sleep >= 0 {
		sleep = env.sleep
	}
	av := "off"
	if env.autovacuum {
		av = "on"
	}
	fmt.Fprintf(w, "\n== backfill: %d rows, fresh frozen warm copies, the table's autovacuum %s for both, backfill.sleep %s, median of %d runs\n", rows, av, sleep, env.runs)
	fmt.Fprintf(w, "targets: rows/s ratio >= %.2f (PostgreSQL %d); WAL ratio <= 1.02; batch p99 < target_batch_time %s; peak RSS < 100 MB\n", target, srv.Major(), tbt)
	fmt.Fprintf(w, "%-34s %8s %10s %7s %10s %7s %9s %9s %7s   %-19s %s\n", "", "seconds", "rows/s", "ratio", "WAL MB", "ratio", "batch p50", "p99", "RSS MB", "verdict", "all runs, s")
	base := medianRun(results[0])
	baseRate := float64(rows) / base.took.Seconds()
	var res sizeResult
	res.rows = rows
	for v, variant := range variants {
		m := medianRun(results[v])
		rate := float64(rows) / m.took.Seconds()
		var all []string
		for _, r := range results[v] {
			all = append(all, fmt.Sprintf("%.2f", r.took.Seconds()))
		}
		ratio, walRatio := rate/baseRate, float64(m.wal)/float64(base.wal)
		p50, p99, rss, verdict := "", "", "", ""
		if variant.o.workers > 0 {
			var batches []time.Duration
			var peak int64
			for _, r := range results[v] {
				batches = append(batches, r.batches...)
				peak = max(peak, r.rss)
			}
			q50, q99 := durationQuantile(batches, 0.5), durationQuantile(batches, 0.99)
			p50, p99 = q50.Round(time.Millisecond).String(), q99.Round(time.Millisecond).String()
			rss = fmt.Sprintf("%.1f", float64(peak)/(1<<20))
			verdict = fmt.Sprintf("%s %s %s %s", passFail(ratio >= target), passFail(walRatio <= 1.02), passFail(q99 < tbt && len(batches) > 0), passFail(peak < 100<<20))
			if v == 1 {
				res.ratio, res.walRatio, res.p99, res.batches, res.rss = ratio, walRatio, q99, len(batches), peak
				res.vacRatio = base.withVacuum().Seconds() / m.withVacuum().Seconds()
				if m.estimate.WALBytes > 0 {
					res.hasEstimate = true
					res.estWAL = float64(m.estimate.WALBytes) / float64(m.wal)
					res.estTime = m.estimate.Duration.Seconds() / m.took.Seconds()
				}
			}
		}
		fmt.Fprintf(w, "%-34s %8.2f %10.0f %7.2f %10.1f %7.3f %9s %9s %7s   %-19s %s\n", variant.name, m.took.Seconds(), rate, ratio,
			float64(m.wal)/(1<<20), walRatio, p50, p99, rss, verdict, strings.Join(all, " "))
	}
	fmt.Fprintf(w, "verdict = rows/s ratio, WAL ratio, batch p99, peak RSS\n")
	for v, variant := range variants {
		if variant.o.workers == 0 {
			continue
		}
		var commits []time.Duration
		for _, r := range results[v] {
			commits = append(commits, r.commits...)
		}
		fmt.Fprintf(w, "%s: of a batch's time, its COMMIT p50 %s, p99 %s (all runs)\n", variant.name,
			durationQuantile(commits, 0.5).Round(10*time.Microsecond), durationQuantile(commits, 0.99).Round(10*time.Microsecond))
	}
	if originNote != "" {
		fmt.Fprintf(w, "%s\n", originNote)
	}

	// Table: the vacuum each method leaves, and the WAL per row.
	fmt.Fprintf(w, "\nwhat each method leaves to vacuum, and its WAL (median run); ratio = the UPDATE's time / the method's, both with their VACUUM\n")
	fmt.Fprintf(w, "%-34s %9s %10s %10s %12s %7s %11s %7s %9s\n", "", "method s", "VACUUM s", "dead found", "method+VAC s", "ratio", "WAL B/row", "ckpts", "FPIs")
	for v, variant := range variants {
		m := medianRun(results[v])
		fmt.Fprintf(w, "%-34s %9.2f %10.2f %10d %12.2f %7.2f %11.1f %7d %9d\n", variant.name, m.took.Seconds(), m.vacuum.Seconds(), m.dead,
			m.withVacuum().Seconds(), base.withVacuum().Seconds()/m.withVacuum().Seconds(), float64(m.wal)/float64(rows), m.checkpoints, m.fpi)
	}

	// Table: plan's estimate against what the backfill did.
	fmt.Fprintf(w, "\nplan's estimate (before each run) against the backfill's (median run); target: within 25%%\n")
	fmt.Fprintf(w, "%-34s %10s %10s %7s %10s %10s %7s   %s\n", "", "est WAL MB", "WAL MB", "ratio", "est s", "s", "ratio", "verdict (WAL, time)")
	for v, variant := range variants {
		if variant.o.workers == 0 {
			continue
		}
		m := medianRun(results[v])
		we := float64(m.estimate.WALBytes) / float64(m.wal)
		te := m.estimate.Duration.Seconds() / m.took.Seconds()
		fmt.Fprintf(w, "%-34s %10.1f %10.1f %7.2f %10.1f %10.2f %7.2f   %s %s\n", variant.name, float64(m.estimate.WALBytes)/(1<<20), float64(m.wal)/(1<<20), we,
			m.estimate.Duration.Seconds(), m.took.Seconds(), te, passFail(within25(we)), passFail(within25(te)))
	}
	if m := medianRun(results[1]); m.estimate.Pace != "" {
		fmt.Fprintf(w, "(plan's pace: %s)\n", m.estimate.Pace)
		if e := m.estimate; e.SampleRead > 0 && len(m.batches) > 0 {
			// What WALByteCost would have made the estimate exact: the
			// measured time a row, less the sleep and what the sample
			// says a row costs besides its write, over the row's WAL.
			perRow := float64(m.took) / float64(rows)
			perRow -= float64(sleep) * float64(len(m.batches)) / float64(rows)
			perRow -= float64(e.SampledPerRow())
			fmt.Fprintf(w, "(plan's sample: %.3f µs a row to read, %.3f to compute, %d bytes of WAL a row; this run's time implies %.1f ns a WAL byte, plan assumes %.1f)\n",
				e.SampleRead.Seconds()*1e6, e.SampleExprs.Seconds()*1e6, e.RowBytes, perRow/float64(e.RowBytes), preflight.WALByteCost)
		}
	}

	// Table: where the CPU goes, per row.
	fmt.Fprintf(w, "\nwhere the backfill's time goes: CPU per row updated, µs, by role, median run (wall µs/row for scale)\n")
	fmt.Fprintf(w, "%-34s %9s %s\n", "", "wall", roleHeader())
	for v, variant := range variants {
		m := medianRun(results[v])
		fmt.Fprintf(w, "%-34s %9.2f %s\n", variant.name, float64(m.took.Microseconds())/float64(rows), roleCells(m.roles.perTxn(int64(rows))))
		fmt.Fprintf(w, "%-34s %9s %s\n", "  of which kernel (sys)", "", roleCells(m.sys.perTxn(int64(rows))))
	}
	fmt.Fprintf(w, "%s\n(app here is the session of the single UPDATE; the daemon's backfill runs in daemon-db)\n", roleLegend)
	return res
}

func within25(ratio float64) bool { return ratio >= 0.75 && ratio <= 1.25 }

// printBackfillSummary is one row per figure and size, with its target.
func printBackfillSummary(b *testing.B, w *os.File, major int, sizes []sizeResult) {
	tbt := config.Default().Backfill.TargetBatchTime
	var ref *sizeResult // the run's 1M-row size, which a 10M ratio must stay within 10% of
	for i := range sizes {
		if sizes[i].rows == 1000000 {
			ref = &sizes[i]
		}
	}
	fmt.Fprintf(w, "\n== backfill summary (cdcbackfill, workers 1, against the single UPDATE), PostgreSQL %d\n", major)
	fmt.Fprintf(w, "%-12s %-44s %12s %-22s %s\n", "rows", "figure", "value", "target", "verdict")
	row := func(rows int, figure, value, target string, ok bool) {
		fmt.Fprintf(w, "%-12d %-44s %12s %-22s %s\n", rows, figure, value, target, passFail(ok))
	}
	for _, s := range sizes {
		t := backfillTarget(major, s.rows)
		row(s.rows, "rows/s ratio", fmt.Sprintf("%.2f", s.ratio), fmt.Sprintf(">= %.2f", t), s.ratio >= t)
		if ref != nil && s.rows > ref.rows {
			row(s.rows, fmt.Sprintf("rows/s ratio / the %d-row ratio", ref.rows), fmt.Sprintf("%.2f", s.ratio/ref.ratio), ">= 0.90", s.ratio >= 0.9*ref.ratio)
		}
		row(s.rows, "WAL ratio", fmt.Sprintf("%.3f", s.walRatio), "<= 1.02", s.walRatio <= 1.02)
		row(s.rows, "batch p99", s.p99.Round(time.Millisecond).String(), "< "+tbt.String(), s.p99 < tbt && s.batches > 0)
		row(s.rows, "daemon peak RSS", fmt.Sprintf("%.1f MB", float64(s.rss)/(1<<20)), "< 100 MB", s.rss < 100<<20)
		fmt.Fprintf(w, "%-12d %-44s %12.2f %-22s %s\n", s.rows, "rows/s ratio, each with its VACUUM", s.vacRatio, "reported", "")
		if s.hasEstimate {
			row(s.rows, "plan's WAL estimate / measured", fmt.Sprintf("%.2f", s.estWAL), "0.75..1.25", within25(s.estWAL))
			row(s.rows, "plan's time estimate / measured", fmt.Sprintf("%.2f", s.estTime), "0.75..1.25", within25(s.estTime))
		}
	}
}

func passFail(ok bool) string { return verdict(ok) }

// hasConfigKey says whether the dotted key (e.g. "sync.origin_filter") is
// one of the config's mapstructure keys.
func hasConfigKey(t reflect.Type, key string) bool {
	head, rest, nested := strings.Cut(key, ".")
	for i := range t.NumField() {
		f := t.Field(i)
		if tag, _, _ := strings.Cut(f.Tag.Get("mapstructure"), ","); tag != head {
			continue
		}
		if !nested {
			return true
		}
		return f.Type.Kind() == reflect.Struct && hasConfigKey(f.Type, rest)
	}
	return false
}

// medianRun is the run of median time.
func medianRun(rs []backfillRun) backfillRun {
	s := append([]backfillRun(nil), rs...)
	sort.Slice(s, func(i, j int) bool { return s[i].took < s[j].took })
	return s[len(s)/2]
}

func durationQuantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(int(q*float64(len(s))), len(s)-1)]
}

// backfillTemplate seeds a template database: users with the new columns
// added and empty, frozen (no run pays for hint bits or freezing), and
// pg_prewarm where the server has it. Each run takes a file copy of it;
// drop drops it (a 10M-row template is 1.6 GB).
func backfillTemplate(b *testing.B, rows int) (name string, drop func()) {
	b.Helper()
	srv := pgtest.Shared(b)
	ctx := context.Background()
	name, dsn, err := srv.CreateDatabase(ctx, fmt.Sprintf("bench_backfill_tmpl_%d", rows))
	if err != nil {
		b.Fatal(err)
	}
	drop = func() { _ = srv.DropDatabase(context.Background(), name) }
	b.Cleanup(drop)
	execSQL(b, dsn,
		`CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text)`,
		fmt.Sprintf(`INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'u' || g || '@example.com' FROM generate_series(1, %d) g`, rows),
		`ALTER TABLE users SET (autovacuum_enabled = off)`,
		`ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text`,
		`VACUUM (FREEZE, ANALYZE) users`)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `CREATE EXTENSION IF NOT EXISTS pg_prewarm`); err != nil {
		b.Logf("no pg_prewarm (%v): copies are warmed by a scan", err)
	}
	return name, drop
}

// copyOf makes a fresh database from the template, warms its table and
// index, turns the table's autovacuum on when env asks, and checkpoints
// (both sides start with the same full-page writes ahead). It returns the
// name and DSN; drop drops it.
func copyOf(b *testing.B, tmpl string, env backfillEnv) (dsn string, drop func()) {
	b.Helper()
	srv := pgtest.Shared(b)
	ctx := context.Background()
	name := fmt.Sprintf("%s_c%d", strings.TrimSuffix(tmpl[:min(len(tmpl), 40)], "_"), time.Now().UnixNano()%1e9)
	// FILE_COPY: a copy of the files, not a WAL-logged rewrite of 1M rows.
	execSQL(b, srv.DSN(), `CREATE DATABASE `+pgx.Identifier{name}.Sanitize()+` TEMPLATE `+pgx.Identifier{tmpl}.Sanitize()+` STRATEGY FILE_COPY`)
	drop = func() {
		if err := srv.DropDatabase(context.Background(), name); err != nil {
			b.Error(err)
		}
	}
	dsn = srv.DSNFor(name, "", "")
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	warm := `SELECT pg_prewarm('users'), pg_prewarm('users_pkey')`
	var hasPrewarm bool
	_ = conn.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_prewarm')`).Scan(&hasPrewarm)
	if !hasPrewarm {
		warm = `SELECT count(*) FROM users`
	}
	stmts := []string{warm, `CHECKPOINT`}
	if env.autovacuum {
		stmts = append([]string{`ALTER TABLE users RESET (autovacuum_enabled)`}, stmts...)
	}
	for _, sql := range stmts {
		if _, err := conn.Exec(ctx, sql); err != nil {
			b.Fatalf("%s: %v", sql, err)
		}
	}
	return dsn, drop
}

// serverCounters reads the checkpoints started and the full-page images
// written since the server's statistics were reset: pg_stat_checkpointer
// on 17+, pg_stat_bgwriter before; pg_stat_wal (14+).
func serverCounters(b *testing.B, conn *pgx.Conn) (checkpoints, fpi int64) {
	b.Helper()
	ctx := context.Background()
	var version int
	if err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
		b.Fatal(err)
	}
	ckpt := `SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter`
	if version >= 170000 {
		ckpt = `SELECT num_timed + num_requested FROM pg_stat_checkpointer`
	}
	if err := conn.QueryRow(ctx, `SELECT (`+ckpt+`)::int8, (SELECT wal_fpi FROM pg_stat_wal)::int8`).Scan(&checkpoints, &fpi); err != nil {
		b.Fatal(err)
	}
	return checkpoints, fpi
}

// vacuumTuplesRE finds the dead tuples VACUUM VERBOSE removed (one line per
// relation: the table's and its TOAST table's).
var vacuumTuplesRE = regexp.MustCompile(`(?m)tuples: (\d+) removed`)

// timedVacuum runs VACUUM (VERBOSE) on users and returns how long it took
// and the dead tuples it removed.
func timedVacuum(b *testing.B, dsn string) (took time.Duration, dead int64) {
	b.Helper()
	ctx := context.Background()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		b.Fatal(err)
	}
	cfg.RuntimeParams["application_name"] = appNameApp
	var mu sync.Mutex
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range vacuumTuplesRE.FindAllStringSubmatch(n.Message+"\n"+n.Detail, -1) {
			v, _ := strconv.ParseInt(m[1], 10, 64)
			dead += v
		}
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	start := time.Now()
	if _, err := conn.Exec(ctx, `VACUUM (VERBOSE) users`); err != nil {
		b.Fatal(err)
	}
	took = time.Since(start)
	mu.Lock()
	defer mu.Unlock()
	return took, dead
}

func walLSN(b *testing.B, conn *pgx.Conn) int64 {
	b.Helper()
	var lsn int64
	if err := conn.QueryRow(context.Background(), `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8`).Scan(&lsn); err != nil {
		b.Fatal(err)
	}
	return lsn
}

// singleUpdate times the locking way: one UPDATE of every row.
func singleUpdate(b *testing.B, tmpl string, env backfillEnv) backfillRun {
	dsn, drop := copyOf(b, tmpl, env)
	defer drop()
	ctx := context.Background()
	conn, err := connectAs(ctx, dsn, appNameApp)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	meter, err := startRoleMeter(dsn, postmasterPID(b, dsn), nil)
	if err != nil {
		b.Fatal(err)
	}
	ckpt0, fpi0 := serverCounters(b, conn)
	lsn0, start := walLSN(b, conn), time.Now()
	if _, err := conn.Exec(ctx, `UPDATE users SET first_name = split_part(full_name, ' ', 1), last_name = split_part(full_name, ' ', 2)`); err != nil {
		b.Fatal(err)
	}
	r := backfillRun{took: time.Since(start)}
	r.roles, r.sys = meter.finish()
	r.wal = walLSN(b, conn) - lsn0
	// This session's WAL statistics reach pg_stat_wal when it goes idle
	// after a forced flush.
	if _, err := conn.Exec(ctx, `SELECT pg_stat_force_next_flush()`); err != nil {
		b.Fatal(err)
	}
	ckpt, fpi := serverCounters(b, conn)
	r.checkpoints, r.fpi = ckpt-ckpt0, fpi-fpi0
	r.vacuum, r.dead = timedVacuum(b, dsn)
	return r
}

// daemonBackfill runs the daemon (throttles off) on a fresh copy and times
// the backfill from the slot's creation to phase sync, by the daemon's
// own events. WAL and CPU are counted from the daemon's start.
func daemonBackfill(b *testing.B, bin, tmpl string, o daemonOptions, name string, env backfillEnv) backfillRun {
	dsn, drop := copyOf(b, tmpl, env)
	defer drop()
	ctx := context.Background()
	conn, err := connectAs(ctx, dsn, appNameBench)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	estimate := planEstimate(b, conn, o)
	ckpt0, fpi0 := serverCounters(b, conn)
	lsn0 := walLSN(b, conn)
	d := newDaemon(b, bin, dsn, name, o)
	meter, err := startRoleMeter(dsn, postmasterPID(b, dsn), d.pid)
	if err != nil {
		b.Fatal(err)
	}
	var took time.Duration
	poll(b, dsn, d, 10*time.Minute, "the backfill to reach phase sync", func(ctx context.Context, conn *pgx.Conn) (bool, string) {
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
	r := backfillRun{took: took, estimate: estimate}
	r.roles, r.sys = meter.finish()
	r.wal = walLSN(b, conn) - lsn0
	if r.rss, err = d.procStatus("VmHWM"); err != nil {
		b.Fatal(err)
	}
	d.stop(b) // its sessions' statistics reach pg_stat_wal as they exit
	ckpt, fpi := serverCounters(b, conn)
	r.checkpoints, r.fpi = ckpt-ckpt0, fpi-fpi0
	// Before the parity check: its scan would prune the dead tuples the
	// VACUUM is to find (the daemon's slot holds no data horizon back).
	r.vacuum, r.dead = timedVacuum(b, dsn)
	r.batches, r.commits = batchTimes(b, d.logPath)
	if bad := checkParity(b, dsn); bad != 0 {
		b.Fatalf("parity after backfill: %d rows differ", bad)
	}
	// Replication origins belong to the cluster, not the database: only
	// abort drops them, and the runs would use up the server's slots for
	// them (max_replication_slots) otherwise.
	d.abort(b)
	return r
}

// planEstimate is what plan says of the backfill of the copy on conn,
// with the daemon's config (the running example; o's workers).
func planEstimate(b *testing.B, conn *pgx.Conn, o daemonOptions) preflight.BackfillCost {
	b.Helper()
	ctx := context.Background()
	cfg := config.Default()
	cfg.Table = "public.users"
	cols := []recompute.Column{{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"}, {Name: "last_name", Expr: "split_part(full_name, ' ', 2)"}}
	for _, c := range cols {
		cfg.Columns = append(cfg.Columns, config.Column{Name: c.Name, Expr: c.Expr})
	}
	if o.workers > 0 {
		cfg.Backfill.Workers = o.workers
	}
	t, err := recompute.Inspect(ctx, conn, "public", "users", cols)
	if err != nil {
		b.Fatal(err)
	}
	c, err := preflight.EstimateBackfillCost(ctx, conn, cfg, t)
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// batchTimes reads the duration of each backfill batch, and of its
// COMMIT, from the daemon's JSON debug log.
func batchTimes(b *testing.B, logPath string) (batches, commits []time.Duration) {
	b.Helper()
	f, err := os.Open(logPath)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var rec struct {
			Msg    string `json:"msg"`
			Took   int64  `json:"took"` // slog's JSON writes a Duration in ns
			Commit int64  `json:"commit"`
		}
		if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "backfill batch" {
			batches = append(batches, time.Duration(rec.Took))
			commits = append(commits, time.Duration(rec.Commit))
		}
	}
	return batches, commits
}
