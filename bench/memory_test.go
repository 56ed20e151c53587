package bench

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

const memoryRows = 1000000

// BenchmarkMemory measures the daemon's peak memory on a 1M-row table: the
// backfill, then, in sync, one application transaction that updates
// full_name of all 1M rows. That transaction reaches the daemon as 1M
// changes at its commit (protocol 1), the worst case for what the daemon
// holds at once. The daemon is the built binary in its own process, so its
// VmHWM (peak RSS, from /proc) is its own; it is read once the slot has
// confirmed the position after that transaction.
func BenchmarkMemory(b *testing.B) {
	bin := daemonBinary(b)
	dsn := seedUsers(b, memoryRows, false)
	d := newDaemon(b, bin, dsn, "bench_mem")
	start := time.Now()
	d.waitPhase(b, "sync", 10*time.Minute)
	backfill := time.Since(start)
	waitCaughtUp(b, dsn, d.slot(), 2*time.Minute)
	hwmSync, err := d.procStatus("VmHWM")
	if err != nil {
		b.Fatal(err)
	}

	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	start = time.Now()
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
	d.abort(b)

	mb := func(n int64) float64 { return float64(n) / (1 << 20) }
	w := os.Stdout
	fmt.Fprintf(w, "\ndaemon memory, %d rows, one run (target: peak RSS < 200 MB)\n", memoryRows)
	fmt.Fprintf(w, "%-52s %12s\n", "", "value")
	fmt.Fprintf(w, "%-52s %11.1fs\n", "expand + backfill until phase sync", backfill.Seconds())
	fmt.Fprintf(w, "%-52s %10.1fMB\n", "VmHWM at sync (after the backfill)", mb(hwmSync))
	fmt.Fprintf(w, "%-52s %11.1fs\n", fmt.Sprintf("application txn updating %d rows", tag.RowsAffected()), txn.Seconds())
	fmt.Fprintf(w, "%-52s %11.1fs\n", "then until confirmed_flush_lsn passed its insert LSN", catchUp.Seconds())
	fmt.Fprintf(w, "%-52s %10.1fMB\n", "VmHWM after it was applied (peak)", mb(hwm))
	fmt.Fprintf(w, "%-52s %10.1fMB\n", "VmRSS then", mb(rss))
	fmt.Fprintf(w, "peak %.1f MB (target < 200 MB: %s); parity 0 rows differ\n", mb(hwm), verdict(hwm < 200<<20))
	b.ReportMetric(mb(hwm), "peak-MB")
}
