package pgserver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrStandbyUnsupported is returned by StartStandby for a server this
// package did not start from local binaries (one given by a DSN, or a
// container).
var ErrStandbyUnsupported = errors.New("pgserver: a standby needs a server started from local binaries (not one given by " + EnvDSN + " or run in a container)")

// Standby is a physical streaming standby of a local server, made with
// pg_basebackup -R -C -S: it streams from the primary through its own
// physical slot. Stop and Start keep its data (the slot then holds the WAL
// it has not received); Remove ends it and drops its slot.
type Standby struct {
	l       *localServer
	primary *Server
	slot    string
}

// StartStandby makes a standby of s streaming through a new physical slot
// named slot, and starts it.
func (s *Server) StartStandby(ctx context.Context, slot string) (_ *Standby, err error) {
	p, ok := s.proc.(*localServer)
	if !ok {
		return nil, ErrStandbyUnsupported
	}
	l, err := newLocalDir(p.binDir, p.major, p.settings, p.logf)
	if err != nil {
		return nil, err
	}
	sb := &Standby{l: l, primary: s, slot: slot}
	defer func() {
		if err != nil {
			_ = sb.Remove()
		}
	}()
	out, err := l.command(ctx, "pg_basebackup", "-D", l.dataDir, "-h", "127.0.0.1", "-p", strconv.Itoa(p.port), "-U", "postgres",
		"-R", "-C", "-S", slot, "-X", "stream", "--checkpoint=fast", "--no-sync").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("pg_basebackup: %w: %s", err, out)
	}
	if err := l.startOnFreePort(ctx); err != nil {
		return nil, fmt.Errorf("start standby: %w", err)
	}
	if err := sb.waitStreaming(ctx); err != nil {
		return nil, err
	}
	s.logf("standby on slot %s ready at %s", slot, l.dsn())
	return sb, nil
}

// DSN is the standby's superuser DSN (it answers read-only queries).
func (sb *Standby) DSN() string { return sb.l.dsn() }

// Slot is the primary's physical slot the standby streams from.
func (sb *Standby) Slot() string { return sb.slot }

// Stop shuts the standby down (fast, clean), keeping its data.
func (sb *Standby) Stop() error {
	escalated, err := sb.l.shutdown(syscall.SIGINT)
	if err == nil && escalated != "" {
		sb.l.logf("standby stop: %s", escalated)
	}
	return err
}

// Start starts a stopped standby again on its port and returns once it
// streams from its slot again.
func (sb *Standby) Start(ctx context.Context) error {
	if err := sb.l.start(ctx); err != nil {
		return err
	}
	return sb.waitStreaming(ctx)
}

// waitStreaming polls the primary until the walsender of the standby's
// slot streams and has had the standby's first reply (its replay
// position).
func (sb *Standby) waitStreaming(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, sb.primary.DSN())
	if err != nil {
		return fmt.Errorf("wait for standby on slot %s: %w", sb.slot, err)
	}
	defer conn.Close(context.Background())
	for {
		var streaming bool
		err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid
			WHERE s.slot_name = $1 AND r.state = 'streaming' AND r.replay_lsn IS NOT NULL)`, sb.slot).Scan(&streaming)
		if err != nil {
			return fmt.Errorf("wait for standby on slot %s: %w", sb.slot, err)
		}
		if streaming {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for standby on slot %s to stream: %w", sb.slot, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Remove stops the standby, removes its directory and drops its slot on
// the primary (waiting for the walsender to let go of it).
func (sb *Standby) Remove() error {
	err := sb.l.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, cerr := pgx.Connect(ctx, sb.primary.DSN())
	if cerr != nil {
		return errors.Join(err, fmt.Errorf("drop slot %s: %w", sb.slot, cerr))
	}
	defer conn.Close(context.Background())
	for {
		_, derr := conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, sb.slot)
		if derr == nil {
			return err
		}
		// 55006: still active until its walsender notices the standby is gone.
		select {
		case <-ctx.Done():
			return errors.Join(err, fmt.Errorf("drop slot %s: %w", sb.slot, derr))
		case <-time.After(100 * time.Millisecond):
		}
	}
}
