package workload

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Daemon is `cdcbackfill run` as a process of its own, as a user runs it
// (its exit code, its output, its memory are its own), for the tests and
// the benchmarks.
type Daemon struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	out  strings.Builder
	log  io.Writer // a copy of the output, when set
	done chan struct{}
	code int
}

// StartDaemon runs bin with `run --config config`, in an environment of
// env alone (plus PATH). The process dies with the caller's (Pdeathsig). Its
// output is kept, and copied to log when not nil.
func StartDaemon(bin, config string, env []string, log io.Writer) (*Daemon, error) {
	d := &Daemon{done: make(chan struct{}), log: log}
	d.cmd = exec.Command(bin, "run", "--config", config)
	d.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	d.cmd.Stdout, d.cmd.Stderr = d, d
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s run: %w", bin, err)
	}
	go func() {
		_ = d.cmd.Wait()
		d.code = d.cmd.ProcessState.ExitCode()
		close(d.done)
	}()
	return d, nil
}

// Write keeps the daemon's output.
func (d *Daemon) Write(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.log != nil {
		_, _ = d.log.Write(p)
	}
	return d.out.Write(p)
}

// Output is everything the daemon wrote so far.
func (d *Daemon) Output() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.out.String()
}

// PID is the daemon's process id.
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// Done is closed when the daemon has exited.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Code is the exit code, once Done is closed.
func (d *Daemon) Code() int { return d.code }

// Wait waits at most timeout for the daemon to exit and returns its exit
// code; ok is false when it still runs.
func (d *Daemon) Wait(timeout time.Duration) (code int, ok bool) {
	select {
	case <-d.done:
		return d.code, true
	case <-time.After(timeout):
		return -1, false
	}
}

// Signal sends sig to the daemon.
func (d *Daemon) Signal(sig os.Signal) error { return d.cmd.Process.Signal(sig) }

// Kill ends the daemon at once (SIGKILL), as a crash would.
func (d *Daemon) Kill() {
	select {
	case <-d.done:
	default:
		_ = d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.done
	}
}

// Stop asks the daemon to stop (SIGTERM: it finishes the batch in hand,
// confirms the slot and exits 0) and waits, killing it after grace.
func (d *Daemon) Stop(grace time.Duration) (code int, killed bool) {
	select {
	case <-d.done:
		return d.code, false
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	if code, ok := d.Wait(grace); ok {
		return code, false
	}
	d.Kill()
	return d.code, true
}
