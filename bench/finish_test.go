package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/phases"
)

func finishRows() int {
	if testing.Short() {
		return 20000
	}
	return 1000000
}

// BenchmarkFinish takes a 1M-row migration to done and measures what the
// rest of the story costs: the daemon's peak memory (the backfill, then
// one application transaction updating full_name of every row: 1M changes
// reaching the daemon at its commit, protocol 1, the most it holds at
// once); the verify pass's rows/s against the backfill's on the same
// table; and the contract cut-over's longest stall, by the daemon's
// figure and by a probe application reading and writing a row in a loop
// through verify and contract.
//
// The daemon is the built binary in its own process, so its VmHWM (peak
// RSS, from /proc) is its own.
func BenchmarkFinish(b *testing.B) {
	rows := finishRows()
	bin := daemonBinary(b)
	dsn := seedUsers(b, rows, false)
	d := newDaemon(b, bin, dsn, "bench_finish", daemonOptions{contract: "auto", hold: 3 * time.Second, throttleOff: true})
	d.waitPhase(b, "sync", 10*time.Minute)
	backfill := phaseTime(b, dsn, "backfill", "sync")
	waitCaughtUp(b, dsn, d.slot(), 2*time.Minute)
	hwmSync, err := d.procStatus("VmHWM")
	if err != nil {
		b.Fatal(err)
	}

	ctx := context.Background()
	conn, err := connectAs(ctx, dsn, appNameApp)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	start := time.Now()
	tag, err := conn.Exec(ctx, `UPDATE users SET full_name = 'x' || id || ' y' || id`)
	if err != nil {
		b.Fatal(err)
	}
	txn := time.Since(start)
	catchUp := waitCaughtUp(b, dsn, d.slot(), 10*time.Minute)
	hwm, err := d.procStatus("VmHWM")
	if err != nil {
		b.Fatal(err)
	}
	rss, _ := d.procStatus("VmRSS")
	if bad := checkParity(b, dsn); bad != 0 {
		b.Fatalf("%d rows differ after the slot caught up\nlog:\n%s", bad, d.logTail())
	}

	// The application now dual-writes: a probe that reads a row and writes
	// its new columns (to the values they hold, so parity stays), in a loop
	// through verify and contract, timing each round trip.
	probe := startProbe(b, dsn, rows+1)
	if out, err := exec.Command(d.bin, "approve", "--config", d.cfgPath).CombinedOutput(); err != nil {
		b.Fatalf("cdcbackfill approve: %v: %s", err, out)
	}
	var verifyStart, passEnd time.Time
	var checked int64
	poll(b, dsn, nil, 10*time.Minute, "the verify pass to end", func(ctx context.Context, conn *pgx.Conn) (bool, string) {
		var phase string
		var done bool
		if err := conn.QueryRow(ctx, `SELECT phase, pass_done, verify_rows_checked FROM cdcbackfill.migrations WHERE name = $1`, d.name).Scan(&phase, &done, &checked); err != nil {
			return false, err.Error()
		}
		if phase == "verify" && verifyStart.IsZero() {
			verifyStart = time.Now()
		}
		if !verifyStart.IsZero() && (done || phase != "verify") {
			passEnd = time.Now()
			return true, ""
		}
		return false, fmt.Sprintf("phase %s, %d rows checked", phase, checked)
	})
	// The daemon exits at done: wait on the state, not on the process.
	poll(b, dsn, nil, 5*time.Minute, "phase done", func(ctx context.Context, conn *pgx.Conn) (bool, string) {
		var phase string
		var lastErr *string
		if err := conn.QueryRow(ctx, `SELECT phase, error FROM cdcbackfill.migrations WHERE name = $1`, d.name).Scan(&phase, &lastErr); err != nil {
			return false, err.Error()
		}
		if lastErr != nil && *lastErr != "" {
			b.Fatalf("daemon error in phase %s: %s\nlog:\n%s", phase, *lastErr, d.logTail())
		}
		return phase == "done", "phase " + phase
	})
	probeRes := probe.finish()
	st := statusJSON(b, d)
	contractFrom, contractTo := phaseWindow(b, dsn, "contract", "done")

	mb := func(n int64) float64 { return float64(n) / (1 << 20) }
	w := os.Stdout
	fmt.Fprintf(w, "\n%s\n", serverLine(b))
	fmt.Fprintf(w, "\n== daemon memory, %d rows, one run (target: peak RSS < 100 MB)\n", rows)
	fmt.Fprintf(w, "%-56s %12s\n", "", "value")
	fmt.Fprintf(w, "%-56s %11.1fs\n", "backfill (phase backfill to phase sync)", backfill.Seconds())
	fmt.Fprintf(w, "%-56s %10.1fMB\n", "VmHWM at sync (after the backfill)", mb(hwmSync))
	fmt.Fprintf(w, "%-56s %11.1fs\n", fmt.Sprintf("application txn updating %d rows", tag.RowsAffected()), txn.Seconds())
	fmt.Fprintf(w, "%-56s %11.1fs\n", "then until confirmed_flush_lsn passed its insert LSN", catchUp.Seconds())
	fmt.Fprintf(w, "%-56s %10.1fMB\n", "VmHWM after it was applied (peak)", mb(hwm))
	fmt.Fprintf(w, "%-56s %10.1fMB\n", "VmRSS then", mb(rss))
	fmt.Fprintf(w, "target: peak %.1f MB < 100 MB: %s (parity: 0 rows differ)\n", mb(hwm), verdict(hwm < 100<<20))

	backfillRate := float64(rows) / backfill.Seconds()
	verifyTook := passEnd.Sub(verifyStart)
	verifyRate := float64(checked) / verifyTook.Seconds()
	fmt.Fprintf(w, "\n== verify, same table, one run (target: verify rows/s >= 2 x the backfill's)\n")
	fmt.Fprintf(w, "%-34s %10s %10s %10s\n", "", "rows", "seconds", "rows/s")
	fmt.Fprintf(w, "%-34s %10d %10.2f %10.0f\n", "backfill (slot to phase sync)", rows, backfill.Seconds(), backfillRate)
	fmt.Fprintf(w, "%-34s %10d %10.2f %10.0f\n", "verify pass (approve to pass_done)", checked, verifyTook.Seconds(), verifyRate)
	fmt.Fprintf(w, "target: verify %.0f >= 2 x backfill %.0f rows/s (ratio %.2f): %s\n", verifyRate, backfillRate, verifyRate/backfillRate, verdict(verifyRate >= 2*backfillRate))
	fmt.Fprintf(w, "(verify timed by polling the state row every %s; a probe application wrote meanwhile)\n", pollInterval)

	fmt.Fprintf(w, "\n== contract cut-over: the application's longest stall, one run (reported: no target)\n")
	if c := st.Contract.Cutover; c != nil {
		fmt.Fprintf(w, "daemon (status --json contract.cutover): longest_stall_ms %.1f, tries %d, lock_wait_ms %.1f, held_ms %.1f, keys_checked %d\n",
			c.LongestStallMS, c.Tries, c.LockWaitMS, c.HeldMS, c.KeysChecked)
	} else {
		fmt.Fprintf(w, "daemon: status --json has no contract.cutover\n")
	}
	fmt.Fprintf(w, "probe: a read and a write of one row per loop, from approve to done: %d round trips, %d failed (must be 0: %s)\n",
		len(probeRes.rtts), probeRes.failed, verdict(probeRes.failed == 0))
	inContract := probeRes.within(contractFrom, contractTo)
	fmt.Fprintf(w, "probe's slowest round trip overlapping the contract phase (%.2fs: cut-over, DDL, slot and publication dropped): %.1f ms over %d round trips\n",
		contractTo.Sub(contractFrom).Seconds(), inContract.slowest().Seconds()*1000, len(inContract.rtts))
	fmt.Fprintf(w, "probe over the whole window (verify and contract): slowest %.1f ms, p99 %.2f ms, p50 %.2f ms\n",
		probeRes.slowest().Seconds()*1000, pctl(probeRes.sortedMS(), 0.99), pctl(probeRes.sortedMS(), 0.5))
	b.ReportMetric(mb(hwm), "peak-MB")
}

// phaseWindow is when the migration entered phase from and phase to, by
// its events (the server's clock: the same host's).
func phaseWindow(b *testing.B, dsn, from, to string) (time.Time, time.Time) {
	b.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	var start, end *time.Time
	if err := conn.QueryRow(ctx, `SELECT min(at) FILTER (WHERE phase = $1), max(at) FILTER (WHERE phase = $2) FROM cdcbackfill.events`, from, to).Scan(&start, &end); err != nil || start == nil || end == nil {
		b.Fatalf("events from %s to %s: %v", from, to, err)
	}
	return *start, *end
}

// phaseTime is the time between the migration's entering phase from and
// phase to, by its events.
func phaseTime(b *testing.B, dsn, from, to string) time.Duration {
	b.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	var secs *float64
	if err := conn.QueryRow(ctx, `SELECT extract(epoch FROM max(at) FILTER (WHERE phase = $2) - min(at) FILTER (WHERE phase = $1))::float8 FROM cdcbackfill.events`, from, to).Scan(&secs); err != nil || secs == nil {
		b.Fatalf("events from %s to %s: %v", from, to, err)
	}
	return time.Duration(*secs * float64(time.Second))
}

// statusJSON runs `cdcbackfill status --json`.
func statusJSON(b *testing.B, d *daemon) phases.StatusReport {
	b.Helper()
	out, err := exec.Command(d.bin, "status", "--json", "--config", d.cfgPath).Output()
	if err != nil {
		b.Fatalf("cdcbackfill status --json: %v: %s", err, out)
	}
	var s phases.StatusReport
	if err := json.Unmarshal(out, &s); err != nil {
		b.Fatalf("status --json: %v\n%s", err, out)
	}
	return s
}

// probe is an application that dual-writes one row in a loop.
type probe struct {
	stop chan struct{}
	done chan struct{}

	mu     sync.Mutex
	rtts   []time.Duration
	ends   []time.Time
	failed int
}

// startProbe reads a row by key and writes its new columns back, on one
// connection, every millisecond, until finish. Rows from firstID on are
// the probe rows no other load touches.
func startProbe(b *testing.B, dsn string, firstID int) *probe {
	b.Helper()
	ctx := context.Background()
	conn, err := connectAs(ctx, dsn, appNameApp)
	if err != nil {
		b.Fatal(err)
	}
	p := &probe{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		defer conn.Close(ctx)
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			case <-time.After(time.Millisecond):
			}
			id := firstID + i%probeRows
			for _, sql := range []string{`SELECT first_name, last_name FROM users WHERE id = $1`,
				`UPDATE users SET first_name = first_name, last_name = last_name WHERE id = $1`} {
				qctx, cancel := context.WithTimeout(ctx, time.Minute)
				start := time.Now()
				_, err := conn.Exec(qctx, sql, id)
				end := time.Now()
				cancel()
				p.mu.Lock()
				if err != nil {
					p.failed++
				} else {
					p.rtts = append(p.rtts, end.Sub(start))
					p.ends = append(p.ends, end)
				}
				p.mu.Unlock()
			}
		}
	}()
	return p
}

type probeResult struct {
	rtts   []time.Duration
	ends   []time.Time
	failed int
}

func (p *probe) finish() probeResult {
	close(p.stop)
	<-p.done
	return probeResult{rtts: p.rtts, ends: p.ends, failed: p.failed}
}

func (r probeResult) slowestIndex() int {
	best := -1
	for i, d := range r.rtts {
		if best < 0 || d > r.rtts[best] {
			best = i
		}
	}
	return best
}

func (r probeResult) slowest() time.Duration {
	if i := r.slowestIndex(); i >= 0 {
		return r.rtts[i]
	}
	return 0
}

// within keeps the round trips that overlap [from, to].
func (r probeResult) within(from, to time.Time) probeResult {
	var out probeResult
	for i, d := range r.rtts {
		if r.ends[i].After(from) && r.ends[i].Add(-d).Before(to) {
			out.rtts, out.ends = append(out.rtts, d), append(out.ends, r.ends[i])
		}
	}
	return out
}

func (r probeResult) sortedMS() []float64 {
	out := make([]float64, len(r.rtts))
	for i, d := range r.rtts {
		out[i] = d.Seconds() * 1000
	}
	sort.Float64s(out)
	return out
}
