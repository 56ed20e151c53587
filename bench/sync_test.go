package bench

import (
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	syncRows      = 200000
	latencyRounds = 5                // latency runs per setup, interleaved
	maxRateTime   = 10 * time.Second // pgbench -T of the unthrottled run
	latencyTime   = 15 * time.Second // pgbench -T of each fixed-rate latency run
	stepTime      = 8 * time.Second  // pgbench -T of each apply-rate step
	drainTime     = 60 * time.Second // longest wait for the lag samples of a run to resolve
)

// BenchmarkSyncLatency measures what the application pays while the daemon
// keeps the new columns in sync, against the same load with no migration
// and with the trigger a trigger-based tool would install, then how fast a
// load the stream keeps up with.
//
// The application is pgbench (4 clients, 2 threads, prepared statements)
// updating full_name of random rows among 200k. Its unthrottled rate with
// no migration is the ceiling; the latency runs use a fixed arrival rate of
// half of it (-R), so each setup is offered the same work and latency is
// measured from each transaction's scheduled start: a stall delays all that
// queue behind it. p50/p99 come from pgbench's per-transaction logs.
//
// Each setup has its own freshly seeded database with the same rows and
// layout. The runs are interleaved (no migration, trigger, cdcbackfill) for
// 5 rounds and each setup reports the median of its runs, so a burst of
// other work on the host hits one run, not one setup. The daemon is the
// built binary in its own process, sharing the host's cores with server
// and load as it would on a small host; it is stopped (SIGTERM, resumable)
// during the other setups' runs, since a walsender decodes the WAL of every
// database, and restarted and caught up before its own.
//
// Beside the latencies it prints where the time goes, so a miss can be
// told from noise: CPU per transaction of the server (postmaster and its
// children, from /proc) and of the daemon; the CPU the rest of the host
// used meanwhile (other tenants); the share of the clients' time spent
// waiting on a row lock (pg_stat_activity, polled every 50ms).
//
// Sustained apply: during each cdcbackfill run, and then in steps of 8s at
// rising rates, a sampler reads every 200ms the slot's lag in bytes and
// times how long until the walsender has sent, and the daemon confirmed,
// the WAL insert position read then; it also updates a probe row the load
// never touches and times until the new columns show it (apply lag, what a
// reader of the new columns sees).
func BenchmarkSyncLatency(b *testing.B) {
	pb := findPgbench(b)
	if pb == "" {
		b.Skip(errNoPgbench)
	}
	bin := daemonBinary(b)

	// (a) no migration.
	dsnA := seedUsers(b, syncRows, true)
	loadA := newPgbench(b, pb, dsnA, syncRows)

	// (c) the trigger-based baseline.
	dsnC := seedUsers(b, syncRows, true)
	execSQL(b, dsnC, `CREATE FUNCTION users_split() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	NEW.first_name := split_part(NEW.full_name, ' ', 1);
	NEW.last_name := split_part(NEW.full_name, ' ', 2);
	RETURN NEW;
END $$`,
		`CREATE TRIGGER users_split BEFORE INSERT OR UPDATE ON users FOR EACH ROW EXECUTE FUNCTION users_split()`,
		`CHECKPOINT`)
	loadC := newPgbench(b, pb, dsnC, syncRows)

	// (b) the daemon: expand and backfill until phase sync, then vacuum
	// what the backfill left (as the seeding did for the others).
	dsnB := seedUsers(b, syncRows, false)
	loadB := newPgbench(b, pb, dsnB, syncRows)
	d := newDaemon(b, bin, dsnB, "bench_sync")
	d.waitPhase(b, "sync", 5*time.Minute)
	execSQL(b, dsnB, `VACUUM ANALYZE users`, `CHECKPOINT`)
	waitCaughtUp(b, dsnB, d.slot(), time.Minute)
	d.stop(b)

	ceiling := loadA.run(b, 0, maxRateTime, false, nil).tps
	rate := ceiling / 2

	// measure runs a load with a sampler beside it (lock waits only
	// without a daemon).
	measure := func(load *pgbench, d *daemon, rate float64, dur time.Duration, withLog bool) (loadResult, lagStats) {
		slot := ""
		if d != nil {
			slot = d.slot()
		}
		sampler, err := startLagSampler(load.dsn, slot, syncRows+1, drainTime)
		if err != nil {
			b.Fatal(err)
		}
		res := load.run(b, rate, dur, withLog, d)
		lag, err := sampler.finish()
		if err != nil {
			b.Fatal(err)
		}
		return res, lag
	}

	var resA, resB, resC []loadResult
	var lagA, lagB, lagC []lagStats
	for r := range latencyRounds {
		res, lag := measure(loadA, nil, rate, latencyTime, true)
		resA, lagA = append(resA, res), append(lagA, lag)
		res, lag = measure(loadC, nil, rate, latencyTime, true)
		resC, lagC = append(resC, res), append(lagC, lag)

		d.start(b)
		d.waitStreaming(b, 2*time.Minute)
		res, lag = measure(loadB, d, rate, latencyTime, true)
		resB, lagB = append(resB, res), append(lagB, lag)
		waitCaughtUp(b, dsnB, d.slot(), 2*time.Minute)
		if bad := checkParity(b, dsnB); bad != 0 {
			b.Fatalf("sync, round %d: %d rows differ after the slot caught up\nlog:\n%s", r+1, bad, d.logTail())
		}
		if r < latencyRounds-1 {
			d.stop(b)
		}
	}
	if bad := checkParity(b, dsnC); bad != 0 {
		b.Fatalf("trigger baseline: %d rows differ", bad)
	}

	// Apply rate: step the offered rate up, 8s each; a step passes when
	// every sample of it resolved within 1s.
	type step struct {
		pct int
		res loadResult
		lag lagStats
	}
	var steps []step
	for _, pct := range []int{50, 75, 100, 125} {
		res, lag := measure(loadB, d, ceiling*float64(pct)/100, stepTime, false)
		steps = append(steps, step{pct: pct, res: res, lag: lag})
		if lag.unresolved > 0 {
			b.Logf("step %d%%: %d samples not resolved within %s; stopping the steps", pct, lag.unresolved, drainTime)
			break
		}
	}
	waitCaughtUp(b, dsnB, d.slot(), 2*time.Minute)
	if bad := checkParity(b, dsnB); bad != 0 {
		b.Fatalf("after the apply-rate steps: %d rows differ after the slot caught up\nlog:\n%s", bad, d.logTail())
	}
	hwm, _ := d.procStatus("VmHWM")
	d.abort(b)

	// Table 1: latency.
	w := os.Stdout
	sumA := summarize(resA, lagA)
	fmt.Fprintf(w, "\nwrite latency, %d rows, pgbench -c 4 -j 2 -M prepared -R %.0f (half the no-migration max of %.0f tps) -T %.0f,\n",
		syncRows, rate, ceiling, latencyTime.Seconds())
	fmt.Fprintf(w, "%d interleaved runs per setup, median of runs (targets: cdcbackfill p99 ratio <= 1.20 and below the trigger's)\n", latencyRounds)
	setups := []struct {
		name string
		sum  latencySummary
	}{{"no migration (baseline)", sumA}, {"cdcbackfill in sync", summarize(resB, lagB)}, {"plpgsql BEFORE trigger", summarize(resC, lagC)}}
	sumB, sumC := setups[1].sum, setups[2].sum
	fmt.Fprintf(w, "%-26s %8s %7s %8s %8s %10s\n", "setup", "tps", "failed", "p50 ms", "p99 ms", "p99 ratio")
	for _, row := range setups {
		sm := row.sum
		fmt.Fprintf(w, "%-26s %8.0f %7d %8.3f %8.3f %10.2f\n", row.name, sm.tps, sm.failed, sm.p50, sm.p99, sm.p99/sumA.p99)
	}
	fmt.Fprintf(w, "cdcbackfill p99 ratio %.2f (target <= 1.20: %s); below the trigger's p99 (%.2f): %s\n",
		sumB.p99/sumA.p99, verdict(sumB.p99/sumA.p99 <= 1.2), sumC.p99/sumA.p99, verdict(sumB.p99 < sumC.p99))
	fmt.Fprintf(w, "where the time goes (over all runs): CPU per transaction of the server and of the daemon; CPU of server, daemon\n")
	fmt.Fprintf(w, "and pgbench, and of the rest of the host (other work: noise), in %% of its %d cores; share of the clients' time\n", runtime.NumCPU())
	fmt.Fprintf(w, "spent waiting on a row lock (polled every 50ms)\n")
	fmt.Fprintf(w, "%-26s %14s %14s %7s %8s %12s   %s\n", "setup", "server us/txn", "daemon us/txn", "ours %", "other %", "lock wait %", "p99 ms of each run")
	for _, row := range setups {
		sm := row.sum
		fmt.Fprintf(w, "%-26s %14.1f %14.1f %7.0f %8.0f %12.2f   %s\n", row.name, sm.serverUS, sm.daemonUS, sm.ours, sm.other, sm.lockWait, sm.runs)
	}

	// Table 2: apply lag.
	fmt.Fprintf(w, "\nsustained apply, same daemon; max over each run of: lag bytes = insert LSN - confirmed_flush_lsn; seconds until\n")
	fmt.Fprintf(w, "sent_lsn (walsender) / confirmed_flush_lsn (daemon) passed the insert LSN read at t; apply = until the new\n")
	fmt.Fprintf(w, "columns showed a probe row's update (target < 1s); CPU as top shows it (100 = one core); lock wait = share\n")
	fmt.Fprintf(w, "of the 4 clients' time waiting on a lock (polled every 50ms); other = rest of the host, %% of its cores\n")
	fmt.Fprintf(w, "%-24s %8s %7s %8s %12s %8s %11s %8s %9s %9s %12s %8s\n", "offered rate", "tps", "failed", "samples", "lag bytes", "sent s", "confirmed s", "apply s",
		"server %", "daemon %", "lock wait %", "other %")
	lagRow := func(name string, res loadResult, lag lagStats) {
		unres := ""
		if lag.unresolved > 0 {
			unres = fmt.Sprintf(" (%d unresolved after %s)", lag.unresolved, drainTime)
		}
		fmt.Fprintf(w, "%-24s %8.0f %7d %8d %12d %8.2f %11.2f %8.2f %9.0f %9.0f %12.2f %8.0f%s\n", name, res.tps, res.failed, lag.samples, lag.maxBytes,
			lag.maxSent.Seconds(), lag.maxConfirmed.Seconds(), lag.maxApply.Seconds(),
			100*res.serverCPU.Seconds()/res.wall.Seconds(), 100*res.daemonCPU.Seconds()/res.wall.Seconds(), 100*lag.lockWaitShare(),
			100*max(0, (res.hostBusy-res.serverCPU-res.daemonCPU-res.loadCPU).Seconds())/res.wall.Seconds()/float64(runtime.NumCPU()), unres)
	}
	var worst lagStats
	for r, lag := range lagB {
		lagRow(fmt.Sprintf("-R %.0f round %d, %.0fs", rate, r+1, latencyTime.Seconds()), resB[r], lag)
		worst.maxBytes = max(worst.maxBytes, lag.maxBytes)
		worst.maxConfirmed = max(worst.maxConfirmed, lag.maxConfirmed)
		worst.maxApply = max(worst.maxApply, lag.maxApply)
		worst.unresolved += lag.unresolved
	}
	// The highest step below the first failing one: a later step that
	// passes after a failure is luck (the host got quieter), not capacity.
	bestApply, bestConfirmed := -1, -1
	applyOK, confirmedOK := true, true
	for i, s := range steps {
		lagRow(fmt.Sprintf("-R %.0f (%d%%), %.0fs", ceiling*float64(s.pct)/100, s.pct, stepTime.Seconds()), s.res, s.lag)
		applyOK = applyOK && s.lag.unresolved == 0 && s.lag.maxApply < time.Second
		confirmedOK = confirmedOK && s.lag.unresolved == 0 && s.lag.maxConfirmed < time.Second
		if applyOK {
			bestApply = i
		}
		if confirmedOK {
			bestConfirmed = i
		}
	}
	best := func(i int) string {
		if i < 0 {
			return "none (the 50% step failed)"
		}
		return fmt.Sprintf("%.0f tps achieved at -R %.0f (%d%%)", steps[i].res.tps, ceiling*float64(steps[i].pct)/100, steps[i].pct)
	}
	fmt.Fprintf(w, "at -R %.0f: max lag %d bytes, confirmed %.2fs, apply %.2fs (apply < 1s: %s; confirmed < 1s: %s)\n",
		rate, worst.maxBytes, worst.maxConfirmed.Seconds(), worst.maxApply.Seconds(),
		verdict(worst.maxApply < time.Second && worst.unresolved == 0), verdict(worst.maxConfirmed < time.Second && worst.unresolved == 0))
	fmt.Fprintf(w, "highest rate with apply lag < 1s at it and every step below: %s; no-migration max %.0f tps\n", best(bestApply), ceiling)
	fmt.Fprintf(w, "the same for confirmed lag < 1s:                           %s\n", best(bestConfirmed))
	fmt.Fprintf(w, "daemon peak RSS (VmHWM) over the last start: %.1f MB\n", float64(hwm)/(1<<20))
	b.ReportMetric(sumB.p99/sumA.p99, "p99-ratio")
}

// latencySummary is one setup over its runs.
type latencySummary struct {
	tps      float64 // mean
	failed   int64   // total
	p50, p99 float64 // median over runs, ms
	runs     string  // each run's p99

	serverUS, daemonUS float64 // CPU per transaction, µs
	ours, other        float64 // CPU used by server, daemon and pgbench, and by the rest of the host, % of its cores
	lockWait           float64 // % of the clients' time waiting on a lock
}

func summarize(rs []loadResult, lags []lagStats) latencySummary {
	var s latencySummary
	var p50s, p99s []float64
	var runs []string
	var processed int64
	var server, daemon, load, host, wall time.Duration
	for _, r := range rs {
		processed += r.processed
		server, daemon, load, host, wall = server+r.serverCPU, daemon+r.daemonCPU, load+r.loadCPU, host+r.hostBusy, wall+r.wall
		s.tps += r.tps / float64(len(rs))
		s.failed += r.failed
		p50s = append(p50s, pctl(r.latencies, 0.5))
		p99 := pctl(r.latencies, 0.99)
		p99s = append(p99s, p99)
		runs = append(runs, strconv.FormatFloat(p99, 'f', 1, 64))
	}
	s.p50, s.p99, s.runs = medianOf(p50s), medianOf(p99s), strings.Join(runs, " ")
	if processed > 0 {
		s.serverUS = float64(server.Microseconds()) / float64(processed)
		s.daemonUS = float64(daemon.Microseconds()) / float64(processed)
	}
	if wall > 0 {
		cores := wall.Seconds() * float64(runtime.NumCPU())
		s.ours = 100 * (server + daemon + load).Seconds() / cores
		s.other = 100 * max(0, (host-server-daemon-load).Seconds()) / cores
	}
	var waits, polls int
	for _, l := range lags {
		waits, polls = waits+l.lockWaits, polls+l.polls
	}
	if polls > 0 {
		s.lockWait = 100 * float64(waits) / float64(4*polls)
	}
	return s
}

func medianOf(v []float64) float64 {
	v = append([]float64(nil), v...)
	sort.Float64s(v)
	if len(v) == 0 {
		return 0
	}
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}
