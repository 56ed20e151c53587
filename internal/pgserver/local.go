package pgserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// tempPrefix starts the name of each server's temporary directory.
const tempPrefix = "cdcbackfill-pgserver-"

var errPortInUse = errors.New("port in use")

// localServer is a postgres process run from a temporary directory.
type localServer struct {
	binDir   string
	major    int
	root     string // temporary directory holding all below; removed by Stop
	dataDir  string
	logPath  string
	port     int
	cred     *syscall.Credential // run as this user (set when we are root)
	settings []string            // name=value, after the defaults
	logf     func(string, ...any)

	cmd  *exec.Cmd     // running postmaster, nil when stopped
	done chan struct{} // closed when cmd has exited
}

// startLocal initializes a cluster of bin in a fresh temporary directory and
// starts it on a free loopback port.
func startLocal(ctx context.Context, bin Binaries, settings []string, logf func(string, ...any)) (_ *localServer, err error) {
	binDir, major := bin.Dir, bin.Major
	l, err := newLocalDir(binDir, major, settings, logf)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = l.Stop()
		}
	}()
	root := l.root
	logf("initdb (PostgreSQL %d from %s, %s) in %s", major, binDir, bin.From, root)
	out, err := l.command(ctx, "initdb", "-D", l.dataDir, "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--locale=C", "--no-sync").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("initdb: %w: %s", err, out)
	}
	// Logical decoding settings go in postgresql.conf, not on the command
	// line, so a test can change them with ALTER SYSTEM and a restart.
	conf, err := os.OpenFile(filepath.Join(l.dataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open postgresql.conf: %w", err)
	}
	_, err = conf.WriteString("\nwal_level = logical\nmax_replication_slots = 20\n")
	if cerr := conf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("write postgresql.conf: %w", err)
	}
	// initdb -A trust writes the same, but do not depend on it.
	const hba = "local all all trust\n" +
		"local replication all trust\n" +
		"host all all 127.0.0.1/32 trust\n" +
		"host replication all 127.0.0.1/32 trust\n"
	if err := os.WriteFile(filepath.Join(l.dataDir, "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		return nil, fmt.Errorf("write pg_hba.conf: %w", err)
	}
	if l.cred != nil {
		if err := os.Chown(filepath.Join(l.dataDir, "pg_hba.conf"), int(l.cred.Uid), int(l.cred.Gid)); err != nil {
			return nil, fmt.Errorf("chown pg_hba.conf: %w", err)
		}
	}

	return l, l.startOnFreePort(ctx)
}

// newLocalDir makes the temporary directory of a server of binDir, owned
// by the OS user the server runs as; the data directory is left to fill.
func newLocalDir(binDir string, major int, settings []string, logf func(string, ...any)) (_ *localServer, err error) {
	removeStale()
	root, err := os.MkdirTemp("", tempPrefix)
	if err != nil {
		return nil, fmt.Errorf("create temp dir: %w", err)
	}
	l := &localServer{
		binDir:   binDir,
		major:    major,
		root:     root,
		dataDir:  filepath.Join(root, "data"),
		logPath:  filepath.Join(root, "postgres.log"),
		settings: settings,
		logf:     logf,
	}
	defer func() {
		if err != nil {
			_ = l.Stop()
		}
	}()
	// The owner file lets removeStale find directories of dead processes.
	if err := os.WriteFile(filepath.Join(root, "owner"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, fmt.Errorf("write owner file: %w", err)
	}
	if err := os.Chmod(root, 0o755); err != nil {
		return nil, fmt.Errorf("chmod temp dir: %w", err)
	}
	if l.cred, err = serverUser(); err != nil {
		return nil, err
	}
	if l.cred != nil {
		if err := os.Chown(root, int(l.cred.Uid), int(l.cred.Gid)); err != nil {
			return nil, fmt.Errorf("chown temp dir: %w", err)
		}
	}
	return l, nil
}

// startOnFreePort starts the server on a free loopback port: another
// process may take the free port before postgres binds it, so it tries
// three.
func (l *localServer) startOnFreePort(ctx context.Context) (err error) {
	for attempt := 1; ; attempt++ {
		if l.port, err = freePort(); err != nil {
			return err
		}
		err = l.start(ctx)
		if err == nil || !errors.Is(err, errPortInUse) || attempt == 3 {
			return err
		}
		l.logf("port %d taken, trying another", l.port)
	}
}

// serverUser returns the OS user to run the server as: nil (ourselves)
// unless we are root, which initdb and postgres refuse. Then postgres, as
// the distributions' packages create it, or nobody on a machine that has
// none (a container with only Go): the server's files are temporary.
func serverUser() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	var errs []error
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
		gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
		if err1 != nil || err2 != nil {
			errs = append(errs, fmt.Errorf("user %s: uid %q, gid %q", name, u.Uid, u.Gid))
			continue
		}
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
	}
	return nil, fmt.Errorf("running as root needs an OS user for the server (postgres or nobody): %w", errors.Join(errs...))
}

func (l *localServer) dsn() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", l.port)
}

// command returns a command running binary name of binDir as the server's
// OS user, from the temporary directory.
func (l *localServer) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(l.binDir, name), args...)
	cmd.Dir = l.root
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: l.cred}
	return cmd
}

// start starts postgres and waits until it accepts connections.
func (l *localServer) start(ctx context.Context) error {
	logFile, err := os.OpenFile(l.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open server log: %w", err)
	}
	defer logFile.Close()
	logStart, _ := logFile.Seek(0, 2)

	// Not CommandContext: the server outlives ctx.
	args := []string{"-D", l.dataDir,
		"-c", "listen_addresses=127.0.0.1",
		"-p", strconv.Itoa(l.port),
		"-c", "unix_socket_directories=" + l.root,
		"-c", "max_wal_senders=20",
		"-c", "fsync=off",
		"-c", "synchronous_commit=off",
		"-c", "full_page_writes=off",
		"-c", "max_connections=200",
		"-c", "shared_buffers=128MB"}
	// The last -c of a name wins.
	for _, kv := range l.settings {
		args = append(args, "-c", kv)
	}
	cmd := l.command(context.Background(), "postgres", args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Own process group: a terminal's Ctrl-C reaches only us, and we stop
	// the server in order. If we die, the server gets SIGQUIT (immediate
	// shutdown) from the kernel.
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	l.cmd, l.done = cmd, done

	if err := WaitReady(ctx, l.dsn(), done); err != nil {
		_, _ = l.shutdown(syscall.SIGQUIT)
		tail := l.logSince(logStart)
		if strings.Contains(tail, "could not bind") || strings.Contains(tail, "could not create any TCP/IP sockets") {
			err = fmt.Errorf("%w: %w", errPortInUse, err)
		}
		return fmt.Errorf("start postgres on port %d: %w; server log:\n%s", l.port, err, tail)
	}
	return nil
}

// shutdownWait is how long each step of shutdown waits for the server to
// exit before the next.
const shutdownWait = 20 * time.Second

// shutdown stops the running server: fast (SIGINT, clean) or immediate
// (SIGQUIT, a crash the next start recovers from). A fast shutdown waits for
// the client of each walsender to confirm all WAL, up to wal_sender_timeout
// (a minute) for one that does not answer, so after shutdownWait it turns
// immediate; an immediate one that hangs is killed. It returns what it had
// to do beyond sig, "" if nothing.
func (l *localServer) shutdown(sig syscall.Signal) (escalated string, err error) {
	if l.cmd == nil {
		return "", nil
	}
	defer func() { l.cmd, l.done = nil, nil }()
	next := map[syscall.Signal]syscall.Signal{syscall.SIGINT: syscall.SIGQUIT, syscall.SIGQUIT: syscall.SIGKILL}
	for {
		select {
		case <-l.done:
			return escalated, nil
		default:
		}
		if sig == syscall.SIGKILL {
			_ = syscall.Kill(-l.cmd.Process.Pid, syscall.SIGKILL)
			<-l.done
			return escalated, nil
		}
		if err := l.cmd.Process.Signal(sig); err != nil {
			return escalated, fmt.Errorf("signal postgres: %w", err)
		}
		select {
		case <-l.done:
			return escalated, nil
		case <-time.After(shutdownWait):
		}
		escalated = fmt.Sprintf("postgres did not stop within %s of %v; sent %v", shutdownWait, sig, next[sig])
		sig = next[sig]
	}
}

// Restart does a fast (clean) shutdown and starts the server again on the
// same port.
func (l *localServer) Restart(ctx context.Context) (string, error) {
	var logStart int64
	if fi, err := os.Stat(l.logPath); err == nil {
		logStart = fi.Size()
	}
	escalated, err := l.shutdown(syscall.SIGINT)
	if err != nil {
		return "", err
	}
	if escalated != "" {
		// Still a restart, as after a crash: say why, and go on.
		l.logf("restart: %s; server log:\n%s", escalated, l.logSince(logStart))
	}
	return l.dsn(), l.start(ctx)
}

// Crash kills the postmaster and every child at once (SIGKILL to the
// process group: no shutdown checkpoint, no WAL flush) and starts the
// server again, which recovers from the WAL on disk.
func (l *localServer) Crash(ctx context.Context) (string, error) {
	if _, err := l.shutdown(syscall.SIGKILL); err != nil {
		return "", err
	}
	return l.dsn(), l.start(ctx)
}

// Stop does an immediate shutdown and removes the temporary directory.
func (l *localServer) Stop() error {
	escalated, err := l.shutdown(syscall.SIGQUIT)
	if escalated != "" {
		err = errors.Join(err, errors.New(escalated))
	}
	return errors.Join(err, os.RemoveAll(l.root))
}

// logSince returns the server log from offset on, at most its last 4 KiB.
func (l *localServer) logSince(offset int64) string {
	b, err := os.ReadFile(l.logPath)
	if err != nil || offset > int64(len(b)) {
		return ""
	}
	b = b[offset:]
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// removeStale removes the temporary directories left by processes that died
// without stopping their server (their postgres got SIGQUIT and is gone).
func removeStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), tempPrefix+"*"))
	for _, d := range dirs {
		if !pidFileDead(filepath.Join(d, "owner"), false) ||
			!pidFileDead(filepath.Join(d, "data", "postmaster.pid"), true) {
			continue
		}
		_ = os.RemoveAll(d)
	}
}

// pidFileDead reports whether the process whose id starts the file is gone;
// a missing file counts as dead when missingOK.
func pidFileDead(path string, missingOK bool) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return missingOK && errors.Is(err, os.ErrNotExist)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	return err == nil && pid > 0 && syscall.Kill(pid, 0) == syscall.ESRCH
}
