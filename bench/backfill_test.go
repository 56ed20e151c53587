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
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

// backfillRows is the table's size: 1M rows, or 20k with -short, the
// smoke run of make test-matrix (the daemon on each server version, not a
// measure).
func backfillRows() int {
	if testing.Short() {
		return 20000
	}
	return 1000000
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
}

// BenchmarkBackfill compares the backfill (throttling off) with one UPDATE
// of the whole table, on fresh copies of the same frozen table, warmed into
// shared buffers, autovacuum off on it for both (the single UPDATE cannot
// pay for vacuum inside its time; the backfill could, halfway). The runs
// alternate and the medians are compared, so a passing disturbance on this
// shared machine does not decide the ratio. Beside the time: the WAL each
// wrote, and where the CPU went.
func BenchmarkBackfill(b *testing.B) {
	runs := 3
	if testing.Short() {
		runs = 1
	}
	rows := backfillRows()
	bin := daemonBinary(b)
	srv := pgtest.Shared(b)
	tmpl := backfillTemplate(b, rows)

	variants := []backfillVariant{
		{name: "single UPDATE (baseline)"},
		{name: "cdcbackfill, workers 1", o: daemonOptions{expanded: true, workers: 1, debugJSON: true, throttleOff: true}},
		{name: "cdcbackfill, workers 2", o: daemonOptions{expanded: true, workers: 2, debugJSON: true, throttleOff: true}},
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
		variants = append(variants, backfillVariant{name: "cdcbackfill, workers 1, client", o: daemonOptions{expanded: true, workers: 1, originFilter: "client", debugJSON: true, throttleOff: true}})
		variants[1].name += ", auto"
	}

	results := make([][]backfillRun, len(variants))
	for i := range runs {
		for v, variant := range variants {
			var r backfillRun
			if variant.o.workers == 0 {
				r = singleUpdate(b, tmpl)
			} else {
				r = daemonBackfill(b, bin, tmpl, variant.o, fmt.Sprintf("bf%d_%d", v, i))
			}
			results[v] = append(results[v], r)
		}
	}

	// Table: rows/s and WAL.
	w := os.Stdout
	target := 0.9
	if srv.Major() < 16 {
		target = 0.7
	}
	tbt := config.Default().Backfill.TargetBatchTime
	fmt.Fprintf(w, "\n== backfill: %d rows, fresh frozen warm copies, autovacuum off on the table for both, median of %d runs\n", rows, runs)
	fmt.Fprintf(w, "%s\n", serverLine(b))
	fmt.Fprintf(w, "targets: rows/s ratio >= %.2f (PostgreSQL %d); WAL ratio <= 1.02; batch p99 < target_batch_time %s\n", target, srv.Major(), tbt)
	fmt.Fprintf(w, "%-34s %8s %10s %7s %10s %7s %9s %9s   %-12s %s\n", "", "seconds", "rows/s", "ratio", "WAL MB", "ratio", "batch p50", "p99", "verdict", "all runs, s")
	base := medianRun(results[0])
	baseRate := float64(rows) / base.took.Seconds()
	for v, variant := range variants {
		m := medianRun(results[v])
		rate := float64(rows) / m.took.Seconds()
		var all []string
		for _, r := range results[v] {
			all = append(all, fmt.Sprintf("%.2f", r.took.Seconds()))
		}
		ratio, walRatio := rate/baseRate, float64(m.wal)/float64(base.wal)
		p50, p99, verdict := "", "", ""
		if variant.o.workers > 0 {
			var batches []time.Duration
			for _, r := range results[v] {
				batches = append(batches, r.batches...)
			}
			q50, q99 := durationQuantile(batches, 0.5), durationQuantile(batches, 0.99)
			p50, p99 = q50.Round(time.Millisecond).String(), q99.Round(time.Millisecond).String()
			verdict = fmt.Sprintf("%s %s %s", passFail(ratio >= target), passFail(walRatio <= 1.02), passFail(q99 < tbt && len(batches) > 0))
		}
		fmt.Fprintf(w, "%-34s %8.2f %10.0f %7.2f %10.1f %7.3f %9s %9s   %-14s %s\n", variant.name, m.took.Seconds(), rate, ratio,
			float64(m.wal)/(1<<20), walRatio, p50, p99, verdict, strings.Join(all, " "))
		if v == 1 {
			b.ReportMetric(ratio, "ratio")
		}
	}
	fmt.Fprintf(w, "verdict = rows/s ratio, WAL ratio, batch p99\n")
	if originNote != "" {
		fmt.Fprintf(w, "%s\n", originNote)
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
// pg_prewarm where the server has it. Each run takes a file copy of it.
func backfillTemplate(b *testing.B, rows int) string {
	b.Helper()
	srv := pgtest.Shared(b)
	ctx := context.Background()
	name, dsn, err := srv.CreateDatabase(ctx, "bench_backfill_tmpl")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = srv.DropDatabase(context.Background(), name) })
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
	return name
}

// copyOf makes a fresh database from the template, warms its table and
// index, and checkpoints (both sides start with the same full-page
// writes ahead). It returns the name and DSN; drop drops it.
func copyOf(b *testing.B, tmpl string) (dsn string, drop func()) {
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
	for _, sql := range []string{warm, `CHECKPOINT`} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			b.Fatalf("%s: %v", sql, err)
		}
	}
	return dsn, drop
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
func singleUpdate(b *testing.B, tmpl string) backfillRun {
	dsn, drop := copyOf(b, tmpl)
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
	lsn0, start := walLSN(b, conn), time.Now()
	if _, err := conn.Exec(ctx, `UPDATE users SET first_name = split_part(full_name, ' ', 1), last_name = split_part(full_name, ' ', 2)`); err != nil {
		b.Fatal(err)
	}
	r := backfillRun{took: time.Since(start)}
	r.roles, r.sys = meter.finish()
	r.wal = walLSN(b, conn) - lsn0
	return r
}

// daemonBackfill runs the daemon (throttles off) on a fresh copy and times
// the backfill from the slot's creation to phase sync, by the daemon's
// own events. WAL and CPU are counted from the daemon's start.
func daemonBackfill(b *testing.B, bin, tmpl string, o daemonOptions, name string) backfillRun {
	dsn, drop := copyOf(b, tmpl)
	defer drop()
	ctx := context.Background()
	conn, err := connectAs(ctx, dsn, appNameBench)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
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
	r := backfillRun{took: took}
	r.roles, r.sys = meter.finish()
	r.wal = walLSN(b, conn) - lsn0
	d.stop(b)
	r.batches = batchTimes(b, d.logPath)
	if bad := checkParity(b, dsn); bad != 0 {
		b.Fatalf("parity after backfill: %d rows differ", bad)
	}
	// Replication origins belong to the cluster, not the database: only
	// abort drops them, and the runs would use up the server's slots for
	// them (max_replication_slots) otherwise.
	d.abort(b)
	return r
}

// batchTimes reads the duration of each backfill batch from the daemon's
// JSON debug log.
func batchTimes(b *testing.B, logPath string) []time.Duration {
	b.Helper()
	f, err := os.Open(logPath)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	var out []time.Duration
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var rec struct {
			Msg  string `json:"msg"`
			Took int64  `json:"took"` // slog's JSON writes a Duration in ns
		}
		if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "backfill batch" {
			out = append(out, time.Duration(rec.Took))
		}
	}
	return out
}
