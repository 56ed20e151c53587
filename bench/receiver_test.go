package bench

// The floor of a slot-based sync: a publication, a pgoutput slot and
// pg_recvlogical reading it and throwing the changes away. Its cost is the
// walsender's decoding and sending, which any reader of the slot pays; what
// cdcbackfill adds above it is the applier.

import (
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

const floorSlot = "bench_floor"

// receiver is pg_recvlogical on floorSlot, as a child process.
type receiver struct {
	path, dsn string
	cmd       *exec.Cmd
	done      chan struct{}
}

// findRecvlogical looks beside the server's binaries, then in
// /usr/lib/postgresql/*/bin (highest version).
func findRecvlogical(b *testing.B) string {
	b.Helper()
	if dir := pgtest.Shared(b).BinDir(); dir != "" {
		if p := filepath.Join(dir, "pg_recvlogical"); isExec(p) {
			return p
		}
	}
	if p, err := exec.LookPath("pg_recvlogical"); err == nil {
		return p
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_recvlogical")
	sort.Slice(matches, func(i, j int) bool { return versionOf(matches[i]) > versionOf(matches[j]) })
	if len(matches) > 0 {
		return matches[0]
	}
	return ""
}

// newReceiver creates the publication and the slot on dsn; start reads it.
func newReceiver(b *testing.B, path, dsn string) *receiver {
	b.Helper()
	execSQL(b, dsn, `CREATE PUBLICATION `+floorSlot+` FOR TABLE users`,
		`SELECT pg_create_logical_replication_slot('`+floorSlot+`', 'pgoutput')`)
	r := &receiver{path: path, dsn: dsn}
	b.Cleanup(r.stop)
	return r
}

// start runs pg_recvlogical, reporting its flush position every second
// (-s 1 -F 1), as a reader that keeps up confirms it.
func (r *receiver) start(b *testing.B) {
	b.Helper()
	r.cmd = exec.Command(r.path, "-d", r.dsn, "--slot", floorSlot, "--start", "-f", os.DevNull,
		"-o", "proto_version=1", "-o", "publication_names="+floorSlot, "-s", "1", "-F", "1", "--no-loop")
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logPath := filepath.Join(b.TempDir(), "pg_recvlogical.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		b.Fatal(err)
	}
	r.cmd.Stdout, r.cmd.Stderr = logFile, logFile
	if err := r.cmd.Start(); err != nil {
		logFile.Close()
		b.Fatalf("start pg_recvlogical: %v", err)
	}
	done := make(chan struct{})
	r.done = done
	cmd := r.cmd
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(done)
	}()
}

func (r *receiver) pid() int {
	if r.cmd == nil || r.cmd.Process == nil {
		return 0
	}
	return r.cmd.Process.Pid
}

// stop ends pg_recvlogical (SIGINT: it confirms and exits).
func (r *receiver) stop() {
	if r.cmd == nil {
		return
	}
	select {
	case <-r.done:
		return
	default:
	}
	_ = r.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.done
	}
}
