package bench

// Helpers of the sync and memory benchmarks: the daemon as a separate
// process (so its RSS is its own), pgbench as the application, and waits on
// conditions with deadlines.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/pgserver"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/workload"
)

// durable are the server settings of the benchmarks, in place of the
// test servers' fast ones: production durability (every commit flushed,
// full pages after each checkpoint), and room for the 1M-row tables in
// shared buffers and their WAL between checkpoints, so neither side of a
// comparison pays for a checkpoint the other does not.
//
// No timed checkpoint either (checkpoint_timeout 1h): the benchmarks
// checkpoint before they measure, so a checkpoint's flushes and the
// full-page images after it land in no run rather than in one setup's run
// by chance.
var durable = []string{"fsync=on", "synchronous_commit=on", "full_page_writes=on", "shared_buffers=512MB", "max_wal_size=8GB", "checkpoint_timeout=1h"}

func TestMain(m *testing.M) {
	if os.Getenv(pgserver.EnvSettings) == "" {
		os.Setenv(pgserver.EnvSettings, strings.Join(durable, " "))
	}
	pgtest.Main(m)
}

// serverLine says which server a table was measured on, with the
// settings that decide the cost of a write as the server reports them
// (a server given by DSN keeps its own).
func serverLine(b *testing.B) string {
	b.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgtest.Shared(b).DSN())
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	var version string
	if err := conn.QueryRow(ctx, `SELECT current_setting('server_version')`).Scan(&version); err != nil {
		b.Fatal(err)
	}
	parts := []string{"PostgreSQL " + version}
	for _, name := range []string{"fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "max_wal_size", "checkpoint_timeout"} {
		var v string
		if err := conn.QueryRow(ctx, `SELECT current_setting($1)`, name).Scan(&v); err != nil {
			b.Fatal(err)
		}
		parts = append(parts, name+"="+v)
	}
	return fmt.Sprintf("server: %s; %d cores", strings.Join(parts, " "), runtime.NumCPU())
}

// seedUsers creates users with ids 1..rows+probeRows (the probe rows come
// last; the pgbench script never touches them) in a fresh database and
// returns its DSN. With filled, it adds first_name/last_name and fills them
// with one UPDATE, so the table has the layout the daemon's backfill leaves
// (every row updated once, then vacuumed).
func seedUsers(b *testing.B, rows int, filled bool) string {
	b.Helper()
	dsn := pgtest.NewDatabase(b)
	stmts := []string{
		`CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text)`,
		fmt.Sprintf(`INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'u' || g || '@example.com' FROM generate_series(1, %d) g`, rows+probeRows),
		`VACUUM ANALYZE users`,
	}
	if filled {
		stmts = append(stmts,
			`ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text`,
			`UPDATE users SET first_name = split_part(full_name, ' ', 1), last_name = split_part(full_name, ' ', 2)`,
			`VACUUM ANALYZE users`)
	}
	execSQL(b, dsn, append(stmts, `CHECKPOINT`)...)
	return dsn
}

func execSQL(b *testing.B, dsn string, stmts ...string) {
	b.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, sql := range stmts {
		if _, err := conn.Exec(ctx, sql); err != nil {
			b.Fatalf("%s: %v", sql, err)
		}
	}
}

func checkParity(b *testing.B, dsn string) int64 {
	b.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	bad, err := workload.OutOfParity(ctx, conn)
	if err != nil {
		b.Fatal(err)
	}
	return bad
}

// daemonBinary builds cmd/cdcbackfill into a temporary directory (fast from
// the build cache after `make build`), falling back to bin/cdcbackfill.
func daemonBinary(b *testing.B) string {
	b.Helper()
	out := filepath.Join(b.TempDir(), "cdcbackfill")
	cmd := exec.Command("go", "build", "-o", out, "github.com/cdcbackfill/cdcbackfill/cmd/cdcbackfill")
	msg, err := cmd.CombinedOutput()
	if err == nil {
		return out
	}
	if fallback, ferr := filepath.Abs("../bin/cdcbackfill"); ferr == nil {
		if _, serr := os.Stat(fallback); serr == nil {
			b.Logf("go build failed (%v: %s); using %s", err, msg, fallback)
			return fallback
		}
	}
	b.Fatalf("build cdcbackfill: %v: %s", err, msg)
	return ""
}

// daemon is `cdcbackfill run` as a child process.
type daemon struct {
	bin, cfgPath, logPath string
	name, dsn             string
	proc                  *workload.Daemon // the running process; nil before start
}

// daemonOptions are what a benchmark changes of the daemon's config; the
// rest is config.Default() plus the running example.
type daemonOptions struct {
	expanded     bool           // the table has the new columns already: no expand statement
	workers      int            // backfill.workers; 0 keeps the default
	originFilter string         // sync.origin_filter; "" keeps the default
	deferFor     time.Duration  // sync.correction deferred with this defer_for; 0 keeps continuous
	contract     string         // contract_policy.mode; "" is manual (the migration stays in verify)
	hold         time.Duration  // contract_policy.hold, with contract
	debugJSON    bool           // log at debug level as JSON (the backfill's batch times)
	throttleOff  bool           // no replica or slot lag throttle
	sleep        *time.Duration // backfill.sleep; nil keeps the default
}

// yaml is the config of migration name on dsn. Dual-write detection is
// manual, so the daemon stays in sync until approved.
func (o daemonOptions) yaml(name, dsn string) string {
	var s strings.Builder
	fmt.Fprintf(&s, "name: %s\ndatabase:\n  dsn: %q\ntable: public.users\n", name, dsn)
	if !o.expanded {
		s.WriteString("expand:\n  - ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text\n")
	}
	s.WriteString(`columns:
  first_name: split_part(full_name, ' ', 1)
  last_name: split_part(full_name, ' ', 2)
contract:
  - ALTER TABLE users DROP COLUMN full_name
rollback:
  - ALTER TABLE users DROP COLUMN first_name, DROP COLUMN last_name
dual_write:
  detect: manual
http:
  listen: ""
`)
	if o.workers > 0 || o.sleep != nil {
		s.WriteString("backfill:\n")
	}
	if o.workers > 0 {
		fmt.Fprintf(&s, "  workers: %d\n", o.workers)
	}
	if o.sleep != nil {
		fmt.Fprintf(&s, "  sleep: %s\n", *o.sleep)
	}
	if o.throttleOff {
		s.WriteString("throttle:\n  max_replica_lag: 0s\n  max_slot_lag: 0\n")
	}
	if o.originFilter != "" || o.deferFor > 0 {
		s.WriteString("sync:\n")
	}
	if o.originFilter != "" {
		fmt.Fprintf(&s, "  origin_filter: %s\n", o.originFilter)
	}
	if o.deferFor > 0 {
		fmt.Fprintf(&s, "  correction: deferred\n  defer_for: %s\n", o.deferFor)
	}
	if o.contract == "" {
		s.WriteString("contract_policy:\n  mode: manual\n")
	} else {
		fmt.Fprintf(&s, "contract_policy:\n  mode: %s\n  hold: %s\n", o.contract, o.hold)
	}
	if o.debugJSON {
		s.WriteString("log:\n  level: debug\n  format: json\n")
	} else {
		s.WriteString("log:\n  level: info\n")
	}
	return s.String()
}

// newDaemon writes the config of migration name on dsn and starts the
// daemon.
func newDaemon(b *testing.B, bin, dsn, name string, o daemonOptions) *daemon {
	b.Helper()
	dir := b.TempDir()
	d := &daemon{bin: bin, name: name, dsn: dsn, cfgPath: filepath.Join(dir, "config.yaml"), logPath: filepath.Join(dir, "daemon.log")}
	if err := os.WriteFile(d.cfgPath, []byte(o.yaml(name, dsn)), 0o600); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.stop(b) })
	d.start(b)
	return d
}

// start runs `cdcbackfill run` (again: it resumes from the state row); its
// output goes to the log file, where the backfill's batch times are read.
func (d *daemon) start(b *testing.B) {
	b.Helper()
	logFile, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	proc, err := workload.StartDaemon(d.bin, d.cfgPath, []string{"HOME=" + os.Getenv("HOME")}, logFile)
	if err != nil {
		logFile.Close()
		b.Fatal(err)
	}
	d.proc = proc
	go func() {
		<-proc.Done()
		logFile.Close()
	}()
}

// stop sends SIGTERM (finish the batch, confirm, exit) and waits; SIGKILL
// after 30s.
func (d *daemon) stop(b *testing.B) {
	if d.proc == nil {
		return
	}
	if _, killed := d.proc.Stop(30 * time.Second); killed {
		b.Logf("daemon did not stop within 30s of SIGTERM; killed pid %d", d.proc.PID())
	}
}

// abort stops the daemon and aborts the migration with the CLI (drops slot
// and publication); the database is dropped at cleanup anyway.
func (d *daemon) abort(b *testing.B) {
	d.stop(b)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, d.bin, "abort", "--config", d.cfgPath).CombinedOutput(); err != nil {
		b.Logf("cdcbackfill abort: %v: %s", err, out)
	}
}

func (d *daemon) slot() string { return (&config.Config{Name: d.name}).SlotName() }

func (d *daemon) logTail() string {
	data, _ := os.ReadFile(d.logPath)
	if len(data) > 3000 {
		data = data[len(data)-3000:]
	}
	return string(data)
}

// procStatus reads a kB field (VmHWM, VmRSS) of /proc/<pid>/status in bytes.
func (d *daemon) procStatus(field string) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.proc.PID()))
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, d.proc.PID())
}

// pollInterval is how often the waits below ask again.
const pollInterval = 50 * time.Millisecond

// poll asks check on its own connection to dsn until it reports done. It
// fails the benchmark after timeout, naming what it waited for and the
// state check last described, and, when d is not nil, as soon as the daemon
// exits, with the end of its log.
func poll(b *testing.B, dsn string, d *daemon, timeout time.Duration, what string, check func(ctx context.Context, conn *pgx.Conn) (done bool, state string)) {
	b.Helper()
	ctx := context.Background()
	conn, err := connectAs(ctx, dsn, appNameBench)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	log := func() string {
		if d == nil {
			return ""
		}
		return "\nlog:\n" + d.logTail()
	}
	var exited <-chan struct{}
	if d != nil {
		exited = d.proc.Done()
	}
	deadline := time.Now().Add(timeout)
	for {
		done, state := check(ctx, conn)
		if done {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s: not within %s (%s)%s", what, timeout, state, log())
		}
		select {
		case <-exited:
			b.Fatalf("daemon exited (%d) while waiting for %s%s", d.proc.Code(), what, log())
		case <-time.After(pollInterval):
		}
	}
}

// waitPhase waits until the migration's phase is want, failing early when
// the daemon exits or records an error.
func (d *daemon) waitPhase(b *testing.B, want string, timeout time.Duration) {
	b.Helper()
	poll(b, d.dsn, d, timeout, "phase "+want, func(ctx context.Context, conn *pgx.Conn) (bool, string) {
		var phase string
		var lastErr *string
		err := conn.QueryRow(ctx, `SELECT phase, error FROM cdcbackfill.migrations WHERE name = $1`, d.name).Scan(&phase, &lastErr)
		if err == nil && phase == want {
			return true, ""
		}
		if lastErr != nil && *lastErr != "" {
			b.Fatalf("daemon error in phase %s: %s\nlog:\n%s", phase, *lastErr, d.logTail())
		}
		return false, fmt.Sprintf("now %q, %v", phase, err)
	})
}

// waitStreaming waits until a daemon reads the slot again, then until it
// has caught up.
func (d *daemon) waitStreaming(b *testing.B, timeout time.Duration) {
	b.Helper()
	start := time.Now()
	poll(b, d.dsn, d, timeout, "a daemon reading slot "+d.slot(), func(ctx context.Context, conn *pgx.Conn) (bool, string) {
		var active bool
		if err := conn.QueryRow(ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, d.slot()).Scan(&active); err != nil {
			b.Fatalf("read slot %s: %v", d.slot(), err)
		}
		return active, "slot inactive"
	})
	waitCaughtUp(b, d.dsn, d.slot(), timeout-time.Since(start))
}

// waitCaughtUp waits until the slot's confirmed_flush_lsn has passed the
// WAL insert position read now (not pg_current_wal_lsn(): with
// synchronous_commit off the write position can trail commits), and
// returns how long that took.
func waitCaughtUp(b *testing.B, dsn, slot string, timeout time.Duration) time.Duration {
	b.Helper()
	start := time.Now()
	var target int64
	poll(b, dsn, nil, timeout, "slot "+slot+" catching up", func(ctx context.Context, conn *pgx.Conn) (bool, string) {
		if target == 0 {
			if err := conn.QueryRow(ctx, `SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8`).Scan(&target); err != nil {
				b.Fatal(err)
			}
		}
		var confirmed int64
		if err := conn.QueryRow(ctx, `SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&confirmed); err != nil {
			b.Fatalf("read slot %s: %v", slot, err)
		}
		return confirmed >= target, fmt.Sprintf("%d bytes behind", target-confirmed)
	})
	return time.Since(start)
}

// pgbench is the application load.
type pgbench struct {
	path   string // the binary
	script string // file
	dsn    string
	rows   int

	postmaster int // for the server's CPU time; 0 when unknown
	// drain, when set, runs after pgbench ends and before the CPU is
	// counted: work the setup put off (deferred corrections) counts too.
	drain func()
}

// findPgbench looks in the local server's binaries, then PATH, then
// /usr/lib/postgresql/*/bin (highest version).
func findPgbench(b *testing.B) string {
	b.Helper()
	if dir := pgtest.Shared(b).BinDir(); dir != "" {
		if p := filepath.Join(dir, "pgbench"); isExec(p) {
			return p
		}
	}
	if p, err := exec.LookPath("pgbench"); err == nil {
		return p
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pgbench")
	sort.Slice(matches, func(i, j int) bool { return versionOf(matches[i]) > versionOf(matches[j]) })
	if len(matches) > 0 {
		return matches[0]
	}
	return ""
}

func versionOf(p string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(p))))
	return v
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// updateScript is the application transaction: update the source column of
// a random row.
const updateScript = `\set id random(1, :rows)
UPDATE users SET full_name = 'a' || :id || ' b' || random() WHERE id = :id;
`

func newPgbench(b *testing.B, path, dsn string, rows int) *pgbench {
	b.Helper()
	script := filepath.Join(b.TempDir(), "update.sql")
	if err := os.WriteFile(script, []byte(updateScript), 0o644); err != nil {
		b.Fatal(err)
	}
	return &pgbench{path: path, script: script, dsn: dsn, rows: rows, postmaster: postmasterPID(b, dsn)}
}

// loadResult is one pgbench run.
type loadResult struct {
	tps       float64
	processed int64
	failed    int64
	latencies []float64 // ms per transaction, from the per-transaction log; nil without one
	txLogs    []string  // the per-transaction log files; nil without one

	roles    roleCPU       // server and client CPU by role during the run
	sys      roleCPU       // of roles, the kernel's
	loadCPU  time.Duration // used by pgbench itself
	wall     time.Duration // of the pgbench process
	hostBusy time.Duration // CPU used on the whole host meanwhile, from /proc/stat
	diskBusy time.Duration // time the host's disks had I/O in flight meanwhile, from /proc/diskstats
}

var (
	tpsRE       = regexp.MustCompile(`(?m)^tps = ([0-9.]+)`)
	processedRE = regexp.MustCompile(`number of transactions actually processed: (\d+)`)
	failedRE    = regexp.MustCompile(`number of failed transactions: (\d+)`)
)

// run runs pgbench with 4 clients on 2 threads for dur; rate > 0 fixes the
// arrival rate (-R); withLog writes per-transaction logs and collects the
// latencies. Under -R, pgbench's per-transaction time counts from the
// scheduled start, so a stall shows up in the latency of every transaction
// it delays (no coordinated omission).
//
// client gives the pid of the process reading the slot (the daemon,
// pg_recvlogical), whose CPU is counted as role client; nil for none.
func (p *pgbench) run(b *testing.B, rate float64, dur time.Duration, withLog bool, client func() int) loadResult {
	b.Helper()
	args := []string{"-n", "-M", "prepared", "-f", p.script, "-D", fmt.Sprintf("rows=%d", p.rows),
		"-c", "4", "-j", "2", "-T", strconv.Itoa(int(dur.Seconds()))}
	if rate > 0 {
		args = append(args, "-R", strconv.FormatFloat(rate, 'f', 0, 64))
	}
	logDir := b.TempDir()
	if withLog {
		args = append(args, "-l", "--log-prefix="+filepath.Join(logDir, "tx"))
	}
	args = append(args, p.dsn)
	ctx, cancel := context.WithTimeout(context.Background(), dur+2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.path, args...)
	cmd.Dir = logDir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	meter, err := startRoleMeter(p.dsn, p.postmaster, client)
	if err != nil {
		b.Fatal(err)
	}
	host0, disk0, start := hostBusy(), diskBusy(), time.Now()
	err = cmd.Run()
	var r loadResult
	r.wall = time.Since(start)
	if p.drain != nil && err == nil {
		p.drain()
	}
	r.hostBusy, r.diskBusy = hostBusy()-host0, diskBusy()-disk0
	r.roles, r.sys = meter.finish()
	if cmd.ProcessState != nil {
		r.loadCPU = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	if err != nil {
		b.Fatalf("pgbench %s: %v\n%s\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	m := tpsRE.FindStringSubmatch(stdout.String())
	if m == nil {
		b.Fatalf("pgbench printed no tps:\n%s\n%s", stdout.String(), stderr.String())
	}
	r.tps, _ = strconv.ParseFloat(m[1], 64)
	if m := processedRE.FindStringSubmatch(stdout.String()); m != nil {
		r.processed, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m := failedRE.FindStringSubmatch(stdout.String()); m != nil {
		r.failed, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if withLog {
		files, _ := filepath.Glob(filepath.Join(logDir, "tx.*"))
		if len(files) == 0 {
			b.Fatalf("pgbench wrote no transaction log in %s", logDir)
		}
		r.txLogs = files
		for _, f := range files {
			lat, err := readTxLog(f)
			if err != nil {
				b.Fatal(err)
			}
			r.latencies = append(r.latencies, lat...)
		}
		sort.Float64s(r.latencies)
	}
	return r
}

// readTxLog reads a pgbench per-transaction log: client_id transaction_no
// time script_no time_epoch time_us [schedule_lag]; time is in µs.
func readTxLog(path string) ([]float64, error) {
	return readTxLogWindow(path, time.Time{}, time.Time{})
}

// readTxLogWindow is readTxLog of the transactions that ended between
// from and to (time_epoch, time_us: when each ended); zero times bound
// nothing.
func readTxLogWindow(path string, from, to time.Time) ([]float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lat []float64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 {
			continue
		}
		us, err := strconv.ParseFloat(fields[2], 64)
		if err != nil {
			continue // "failed" / "skipped": counted from the summary
		}
		if !from.IsZero() || !to.IsZero() {
			if len(fields) < 6 {
				continue
			}
			sec, err1 := strconv.ParseInt(fields[4], 10, 64)
			usec, err2 := strconv.ParseInt(fields[5], 10, 64)
			end := time.Unix(sec, usec*1000)
			if err1 != nil || err2 != nil || end.Before(from) || !to.IsZero() && end.After(to) {
				continue
			}
		}
		lat = append(lat, us/1000)
	}
	return lat, sc.Err()
}

// pctl is the q quantile of sorted values, nearest rank.
func pctl(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// lagStats is what a lagSampler saw over one load.
type lagStats struct {
	maxBytes     int64           // pg_current_wal_insert_lsn() - confirmed_flush_lsn
	maxSent      time.Duration   // how long until the walsender's sent_lsn passed it (decoding, server side)
	maxConfirmed time.Duration   // how long until confirmed_flush_lsn passed the insert position read at t
	maxApply     time.Duration   // probe committed -> the new columns show it
	applyLags    []time.Duration // each resolved probe's
	unresolved   int             // samples still pending at the drain deadline (their age counts in the maxima)
	samples      int
	polls        int // 50ms polls while loading
	lockWaits    int // pgbench backends seen waiting on a lock, summed over polls
	// What pgbench's backends were doing at each poll, counted by
	// wait_event_type:wait_event ("CPU" when active and waiting on nothing;
	// idle backends, waiting for pgbench, not counted).
	waits map[string]int
}

// lockWaitShare is the share of the 4 clients' time spent waiting on a lock
// (row locks of the applier's statements, or of each other), by sampling.
func (l lagStats) lockWaitShare() float64 {
	if l.polls == 0 {
		return 0
	}
	return float64(l.lockWaits) / float64(4*l.polls)
}

// lagSampler samples the slot every 200ms while the load runs: lag in
// bytes, and the insert position to time until sent_lsn and
// confirmed_flush_lsn pass it. At each sample it also updates a probe row
// (one the load never touches, a different one each time) and times until
// the new columns show that update: the apply lag a reader of the new
// columns sees, independent of when the daemon reports its position to the
// server. A different row each time, because the daemon recomputes from
// the current row: a row updated again before the daemon reached its first
// change would show the second one early and hide the lag.
type lagSampler struct {
	stop chan struct{}
	done chan struct{}
	res  lagStats
	err  error
}

const (
	probeTick = 50 * time.Millisecond // polling; samples and probes every 4th tick
	probeRows = 1000                  // probe rows per table, ids rows+1..rows+probeRows; a run uses at most one per sample
)

// probeRun makes each sampler's probe values unique, so a probe row
// reused by a later run never shows its value in advance.
var probeRun atomic.Int64

// waitQuery counts what the active pgbench backends are doing.
const waitQuery = `SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), count(*)::int FROM pg_stat_activity
	WHERE datname = current_database() AND application_name = 'pgbench' AND state = 'active' GROUP BY 1`

func (s *lagSampler) sampleWaits(ctx context.Context, conn *pgx.Conn) error {
	rows, err := conn.Query(ctx, waitQuery)
	if err != nil {
		return fmt.Errorf("sample wait events: %w", err)
	}
	if s.res.waits == nil {
		s.res.waits = map[string]int{}
	}
	var what string
	var n int
	_, err = pgx.ForEachRow(rows, []any{&what, &n}, func() error { s.res.waits[what] += n; return nil })
	return err
}

// lockWaitQuery counts the pgbench backends waiting on a lock.
const lockWaitQuery = `SELECT count(*)::int FROM pg_stat_activity
	WHERE datname = current_database() AND application_name = 'pgbench' AND wait_event_type = 'Lock'`

// startLagSampler starts sampling the slot of the table whose probe rows
// start at firstProbe. With slot "", it only counts lock waits, for a
// setup with no migration.
func startLagSampler(dsn, slot string, firstProbe int, drain time.Duration) (*lagSampler, error) {
	ctx := context.Background()
	conn, err := connectAs(ctx, dsn, appNameBench)
	if err != nil {
		return nil, err
	}
	probe, err := connectAs(ctx, dsn, appNameBench)
	if err != nil {
		conn.Close(ctx)
		return nil, err
	}
	s := &lagSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer conn.Close(ctx)
		defer probe.Close(ctx)
		s.err = s.loop(ctx, conn, probe, slot, firstProbe, drain)
	}()
	return s, nil
}

// finish tells the sampler the load has ended and waits until every sample
// is resolved or the drain deadline passed.
func (s *lagSampler) finish() (lagStats, error) {
	close(s.stop)
	<-s.done
	return s.res, s.err
}

func (s *lagSampler) loop(ctx context.Context, conn, probe *pgx.Conn, slot string, firstProbe int, drain time.Duration) error {
	type pending struct {
		at  time.Time
		lsn int64 // insert position
	}
	type pendingProbe struct {
		at   time.Time
		id   int64
		want string // first_name once applied
	}
	var lsns, sent []pending
	var probes []pendingProbe
	run := probeRun.Add(1)
	tick := time.NewTicker(probeTick)
	defer tick.Stop()
	stop := s.stop
	loading := true
	var deadline time.Time
	seq := 0
	for n := 0; ; n++ {
		select {
		case <-stop:
			stop, loading = nil, false
			deadline = time.Now().Add(drain)
		case <-tick.C:
		}
		if loading {
			if err := s.sampleWaits(ctx, conn); err != nil {
				return err
			}
		}
		if slot == "" { // no migration: lock waits only
			if !loading {
				return nil
			}
			var lockWaits int
			if err := conn.QueryRow(ctx, lockWaitQuery).Scan(&lockWaits); err != nil {
				return fmt.Errorf("sample lock waits: %w", err)
			}
			s.res.polls++
			s.res.lockWaits += lockWaits
			continue
		}
		var insert, confirmed int64
		var sentLSN *int64
		var lockWaits int
		if err := conn.QueryRow(ctx, `SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8,
				pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::int8,
				(SELECT pg_wal_lsn_diff(sent_lsn, '0/0')::int8 FROM pg_stat_replication WHERE pid = active_pid),
				(`+lockWaitQuery+`)
			FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&insert, &confirmed, &sentLSN, &lockWaits); err != nil {
			return fmt.Errorf("sample slot %s: %w", slot, err)
		}
		applied := map[int64]string{}
		if len(probes) > 0 {
			ids := make([]int64, len(probes))
			for i, p := range probes {
				ids[i] = p.id
			}
			rows, err := conn.Query(ctx, `SELECT id, coalesce(first_name, '') FROM users WHERE id = ANY($1)`, ids)
			if err != nil {
				return fmt.Errorf("read probe rows: %w", err)
			}
			var id int64
			var first string
			if _, err := pgx.ForEachRow(rows, []any{&id, &first}, func() error { applied[id] = first; return nil }); err != nil {
				return fmt.Errorf("read probe rows: %w", err)
			}
		}
		now := time.Now()
		for len(lsns) > 0 && confirmed >= lsns[0].lsn {
			s.res.maxConfirmed = max(s.res.maxConfirmed, now.Sub(lsns[0].at))
			lsns = lsns[1:]
		}
		for len(sent) > 0 && sentLSN != nil && *sentLSN >= sent[0].lsn {
			s.res.maxSent = max(s.res.maxSent, now.Sub(sent[0].at))
			sent = sent[1:]
		}
		probes = slices.DeleteFunc(probes, func(p pendingProbe) bool {
			if applied[p.id] != p.want {
				return false
			}
			s.res.maxApply = max(s.res.maxApply, now.Sub(p.at))
			s.res.applyLags = append(s.res.applyLags, now.Sub(p.at))
			return true
		})
		if loading {
			s.res.maxBytes = max(s.res.maxBytes, insert-confirmed)
			s.res.polls++
			s.res.lockWaits += lockWaits
		}
		// Every 200ms while loading. Not once more at the end: a position
		// read when the WAL stops may be passed only by the next record
		// written and flushed, seconds later on an idle server.
		if loading && n%4 == 0 {
			s.res.samples++
			lsns = append(lsns, pending{now, insert})
			sent = append(sent, pending{now, insert})
			id := int64(firstProbe + seq%probeRows)
			seq++
			want := fmt.Sprintf("p%d_%d", run, seq)
			if _, err := probe.Exec(ctx, `UPDATE users SET full_name = $1 WHERE id = $2`, want+" probe", id); err != nil {
				return fmt.Errorf("probe update: %w", err)
			}
			probes = append(probes, pendingProbe{time.Now(), id, want})
		}
		if !loading && len(lsns) == 0 && len(sent) == 0 && len(probes) == 0 {
			return nil
		}
		if !loading && now.After(deadline) {
			s.res.unresolved = len(lsns) + len(sent) + len(probes)
			if len(lsns) > 0 {
				s.res.maxConfirmed = max(s.res.maxConfirmed, now.Sub(lsns[0].at))
			}
			if len(sent) > 0 {
				s.res.maxSent = max(s.res.maxSent, now.Sub(sent[0].at))
			}
			for _, p := range probes {
				s.res.maxApply = max(s.res.maxApply, now.Sub(p.at))
				s.res.applyLags = append(s.res.applyLags, now.Sub(p.at))
			}
			return nil
		}
	}
}

// userHZ is the clock tick of /proc/<pid>/stat times (USER_HZ, 100 on
// every Linux ABI Go supports).
const userHZ = 100

// procStat reads ppid, own CPU (utime+stime) and reaped children's CPU
// (cutime+cstime) of pid.
func procStat(pid int) (ppid int, self, children time.Duration, err error) {
	t, err := readProcTimes(pid)
	return t.ppid, t.user + t.sys, t.children, err
}

// procTimes are the times of /proc/<pid>/stat.
type procTimes struct {
	ppid      int
	user, sys time.Duration // utime, stime: sys is the kernel's work for the process (syscalls, I/O)
	children  time.Duration // cutime+cstime: reaped children's
}

func readProcTimes(pid int) (procTimes, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procTimes{}, err
	}
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return procTimes{}, fmt.Errorf("/proc/%d/stat: no comm", pid)
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 15 {
		return procTimes{}, fmt.Errorf("/proc/%d/stat: short", pid)
	}
	n := func(s string) int64 { v, _ := strconv.ParseInt(s, 10, 64); return v }
	tick := func(v int64) time.Duration { return time.Duration(v) * time.Second / userHZ }
	return procTimes{ppid: int(n(f[1])), user: tick(n(f[11])), sys: tick(n(f[12])), children: tick(n(f[13]) + n(f[14]))}, nil
}

// hostBusy is the CPU time all processes of the host have used since
// boot: /proc/stat's cpu line less idle and iowait.
func hostBusy() time.Duration {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return 0
	}
	var busy int64
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if i == 3 || i == 4 || i >= 8 { // idle, iowait; guest times are already in user
			continue
		}
		busy += n
	}
	return time.Duration(busy) * time.Second / userHZ
}

// diskBusy is the time the host's disks (those in /sys/block, not
// partitions; loop and ram devices left out) have had I/O in flight since
// boot: /proc/diskstats' io_ticks, the most busy of them. Every commit
// waits for a flush: a disk busy with others' I/O shows in latency.
func diskBusy() time.Duration {
	data, err := os.ReadFile("/proc/diskstats")
	if err != nil {
		return 0
	}
	var busiest int64
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 13 || strings.HasPrefix(f[2], "loop") || strings.HasPrefix(f[2], "ram") {
			continue
		}
		if _, err := os.Stat("/sys/block/" + f[2]); err != nil {
			continue // a partition
		}
		ms, _ := strconv.ParseInt(f[12], 10, 64)
		busiest = max(busiest, ms)
	}
	return time.Duration(busiest) * time.Millisecond
}

// postmasterPID finds the local server's postmaster as the parent of a
// backend; 0 when the server is not a process of this host.
func postmasterPID(b *testing.B, dsn string) int {
	b.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	var backend int
	if err := conn.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&backend); err != nil {
		b.Fatal(err)
	}
	ppid, _, _, err := procStat(backend)
	if err != nil {
		return 0
	}
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", ppid)); err != nil || !strings.HasPrefix(string(comm), "postgres") {
		return 0
	}
	return ppid
}

// pid is the daemon process's (0 when not running).
func (d *daemon) pid() int {
	if d == nil || d.proc == nil {
		return 0
	}
	return d.proc.PID()
}

var errNoPgbench = errors.New("no pgbench: install the PostgreSQL server or client binaries (postgresql-contrib on older Debian)")
