package bench

// CPU by role: which server processes (and which client process) used the
// CPU of a measured interval. The server's processes are the postmaster's
// children, read from /proc; pg_stat_activity says what each one is.

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// role is who a process works for.
type role int

const (
	roleApp        role = iota // backends of the application (pgbench, or the single UPDATE)
	roleWalsender              // walsenders: decoding and sending the slot's changes
	roleDaemonSQL              // backends of the daemon's SQL sessions (application_name cdcbackfill*)
	roleClient                 // the daemon process itself, or pg_recvlogical for the floor
	roleAutovacuum             // autovacuum workers (short-lived: told from /proc as well as pg_stat_activity)
	roleOther                  // the server's own processes: WAL writer, checkpointer, autovacuum launcher...
	roleBench                  // this benchmark's own sessions (samplers): left out of every total
	nRoles
)

// appNameBench marks this benchmark's own sessions in pg_stat_activity.
const appNameBench = "bench-sampler"

// appNameApp marks a session that plays the application (the single
// UPDATE); pgbench's sessions say "pgbench".
const appNameApp = "bench-app"

func classify(backendType, appName string) role {
	switch {
	case backendType == "walsender":
		return roleWalsender
	case backendType == "autovacuum worker":
		return roleAutovacuum
	case backendType != "client backend":
		return roleOther
	case strings.HasPrefix(appName, "cdcbackfill"):
		return roleDaemonSQL
	case appName == "pgbench" || appName == appNameApp:
		return roleApp
	case appName == appNameBench:
		return roleBench
	}
	return roleOther
}

// roleCPU is CPU time by role over an interval.
type roleCPU [nRoles]time.Duration

// total is the CPU of the application and of the migration: every role
// but this benchmark's own sessions.
func (c roleCPU) total() time.Duration {
	var t time.Duration
	for r, d := range c {
		if role(r) != roleBench {
			t += d
		}
	}
	return t
}

func (c roleCPU) add(o roleCPU) roleCPU {
	for i := range c {
		c[i] += o[i]
	}
	return c
}

// perTxn is each role's CPU per transaction, in µs.
func (c roleCPU) perTxn(txns int64) [nRoles]float64 {
	var out [nRoles]float64
	if txns <= 0 {
		return out
	}
	for i, d := range c {
		out[i] = float64(d.Microseconds()) / float64(txns)
	}
	return out
}

// roleMeter samples the CPU of each child of the postmaster every
// procTick, and what pg_stat_activity says it is every 4th, and the CPU of
// one client process. An autovacuum worker may live less than that: its
// process title (/proc/<pid>/cmdline) names it at the first /proc sample,
// and its last figure is kept. A
// backend that exits between two samples (pgbench's, at the end of a run)
// loses its last moments to the sampling; the postmaster's reaped-children
// time has them, and they are given to the roles of the processes that
// exited, in proportion to what was seen of each.
type roleMeter struct {
	postmaster int
	client     func() int // pid of the client process (daemon, pg_recvlogical); 0 if none
	conn       *pgx.Conn

	mu        sync.Mutex
	base      map[int]procTimes // at the start (zero for a process started since)
	last      map[int]procTimes // at the latest sample
	roles     map[int]role
	reaped0   time.Duration // the postmaster's own and reaped children's CPU at the start
	client0   procTimes
	clientPID int

	stop chan struct{}
	done chan struct{}
}

// startRoleMeter starts sampling. client may be nil.
func startRoleMeter(dsn string, postmaster int, client func() int) (*roleMeter, error) {
	if postmaster == 0 {
		return nil, fmt.Errorf("the server is not a process of this host: no CPU by role")
	}
	conn, err := connectAs(context.Background(), dsn, appNameBench)
	if err != nil {
		return nil, err
	}
	m := &roleMeter{postmaster: postmaster, client: client, conn: conn,
		base: map[int]procTimes{}, last: map[int]procTimes{}, roles: map[int]role{},
		stop: make(chan struct{}), done: make(chan struct{})}
	if client != nil {
		m.clientPID = client()
		if m.clientPID != 0 {
			m.client0, _ = readProcTimes(m.clientPID)
		}
	}
	_, self, reaped, _ := procStat(postmaster)
	m.reaped0 = self + reaped
	for pid, cpu := range children(postmaster) {
		m.base[pid], m.last[pid] = cpu, cpu
	}
	m.classify()
	go m.loop()
	return m, nil
}

func (m *roleMeter) loop() {
	defer close(m.done)
	tick := time.NewTicker(procTick)
	defer tick.Stop()
	for n := 1; ; n++ {
		select {
		case <-m.stop:
			return
		case <-tick.C:
			m.sampleProc(n%4 == 0)
		}
	}
}

// procTick is how often the meter reads /proc (every 4th time
// pg_stat_activity too).
const procTick = 25 * time.Millisecond

func (m *roleMeter) sample() { m.sampleProc(true) }

func (m *roleMeter) sampleProc(activity bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for pid, cpu := range children(m.postmaster) {
		m.last[pid] = cpu
		if _, ok := m.roles[pid]; !ok && isAutovacuumWorker(pid) {
			m.roles[pid] = roleAutovacuum
		}
	}
	if activity {
		m.classify()
	}
}

// isAutovacuumWorker reads the process title PostgreSQL sets.
func isAutovacuumWorker(pid int) bool {
	cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(cmd), "autovacuum worker")
}

// classify learns the role of the backends it has not classified yet
// (pg_stat_activity's application_name is set once the session starts).
func (m *roleMeter) classify() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	rows, err := m.conn.Query(ctx, `SELECT pid, coalesce(backend_type, ''), coalesce(application_name, '') FROM pg_stat_activity`)
	if err != nil {
		return
	}
	var pid int
	var bt, app string
	_, _ = pgx.ForEachRow(rows, []any{&pid, &bt, &app}, func() error {
		if r, ok := m.roles[pid]; !ok || r == roleOther && bt == "client backend" {
			m.roles[pid] = classify(bt, app)
		}
		return nil
	})
}

// finish takes a last sample and returns the CPU by role since the start,
// and of it the part the kernel spent for the processes (sys: syscalls,
// I/O; as sampled, without the unseen tail of exited processes).
func (m *roleMeter) finish() (cpu, sys roleCPU) {
	close(m.stop)
	<-m.done
	m.sample()
	m.mu.Lock()
	defer m.mu.Unlock()
	defer m.conn.Close(context.Background())

	var c roleCPU
	alive := children(m.postmaster)
	var goneSeen roleCPU // CPU seen of the processes that exited
	for pid, last := range m.last {
		base := m.base[pid]
		d := last.user + last.sys - base.user - base.sys
		r, ok := m.roles[pid]
		if !ok {
			r = roleOther
		}
		c[r] += d
		sys[r] += last.sys - base.sys
		if _, ok := alive[pid]; !ok {
			goneSeen[r] += d
		}
	}
	// What exited processes used after their last sample: the growth of
	// the postmaster's reaped-children time beyond what was seen of them.
	_, self, reaped, _ := procStat(m.postmaster)
	var seen time.Duration
	for _, d := range goneSeen {
		seen += d
	}
	if tail := self + reaped - m.reaped0 - seen; tail > 0 {
		if seen == 0 {
			c[roleOther] += tail
		} else {
			for r, d := range goneSeen {
				c[r] += time.Duration(float64(tail) * float64(d) / float64(seen))
			}
		}
	}
	if m.client != nil && m.clientPID != 0 {
		if t, err := readProcTimes(m.clientPID); err == nil {
			c[roleClient] = t.user + t.sys - m.client0.user - m.client0.sys
			sys[roleClient] = t.sys - m.client0.sys
		}
	}
	return c, sys
}

// children maps each live child of the postmaster to its times so far.
func children(postmaster int) map[int]procTimes {
	out := map[int]procTimes{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if t, err := readProcTimes(pid); err == nil && t.ppid == postmaster {
			out[pid] = t
		}
	}
	return out
}

// connectAs connects to dsn with application_name app.
func connectAs(ctx context.Context, dsn, app string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.RuntimeParams["application_name"] = app
	return pgx.ConnectConfig(ctx, cfg)
}

// roleHeader and roleCells print CPU per transaction by role.
func roleHeader() string {
	return fmt.Sprintf("%9s %9s %9s %9s %9s %9s %9s", "app", "walsender", "daemon-db", "client", "autovac", "other", "total")
}

func roleCells(us [nRoles]float64) string {
	var total float64
	for r, v := range us {
		if role(r) != roleBench {
			total += v
		}
	}
	return fmt.Sprintf("%9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f", us[roleApp], us[roleWalsender], us[roleDaemonSQL], us[roleClient], us[roleAutovacuum], us[roleOther], total)
}

// roleLegend says what the role columns hold.
const roleLegend = `roles: app = the application's backends; walsender = decoding and sending the slot; daemon-db = backends of the
daemon's SQL sessions; client = the daemon process itself (pg_recvlogical for the floor); autovac = autovacuum
workers; other = the server's own processes (WAL writer, checkpointer, ...); total = all of these (this benchmark's samplers are left out)`
