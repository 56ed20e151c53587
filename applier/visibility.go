package applier

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Poll intervals of waitVisible: the wait is normally microseconds, but may
// last as long as a synchronous standby takes to answer.
const (
	visibilityPollMin = 2 * time.Millisecond
	visibilityPollMax = 50 * time.Millisecond
	visibilityWarnAt  = time.Second
)

// snapshotSQL takes a new snapshot (each statement outside a transaction gets
// its own under READ COMMITTED) and returns it as "xmin:xmax:xip,...". The
// xids are compared in Go: the stream gives 32-bit xids and the snapshot
// 64-bit ones with the epoch, whose low 32 bits are the xid.
const snapshotSQL = `SELECT pg_current_snapshot()::text`

// waitVisible polls new snapshots on the applier's connection, between
// statements, until none of xids is running in one. waited reports whether
// any was running at the first look; such a wait is counted in
// VisibilityWaits when it starts, so a long one shows while it lasts.
func (a *Applier) waitVisible(ctx context.Context, xids []uint32) (waited bool, err error) {
	start := time.Now()
	poll := visibilityPollMin
	warned := false
	for {
		var snap string
		if err := a.conn.QueryRow(ctx, snapshotSQL).Scan(&snap); err != nil {
			return waited, fmt.Errorf("take a snapshot to check that %d transactions are visible: %w", len(xids), err)
		}
		running, err := stillRunning(snap, xids)
		if err != nil {
			return waited, err
		}
		if len(running) == 0 {
			if warned {
				a.log.Info("transactions visible; applying", "waited", time.Since(start))
			}
			return waited, nil
		}
		if !waited {
			waited = true
			a.visWaits.Add(1)
		}
		xids = running
		if !warned && time.Since(start) >= visibilityWarnAt {
			warned = true
			a.log.Warn("waiting for transactions committed in WAL to become visible (a synchronous standby not answering?)",
				"xids", running, "waited", time.Since(start))
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return waited, ctx.Err()
		case <-t.C:
		}
		poll = min(2*poll, visibilityPollMax)
	}
}

// stillRunning returns the xids that the snapshot snap, the text form of a
// pg_snapshot ("xmin:xmax:xip,xip,..."), counts as running: those listed in
// xip, and those at or after xmax. The second part matters: a snapshot's xip
// lists only running transactions below xmax (one past the latest completed
// xid), so a transaction with a higher xid that is still running is not in
// it. The xids are 32 bits and wrap around; a transaction the stream sent is
// committed in WAL after the slot's catalog_xmin, which holds back
// datfrozenxid, so wraparound protection keeps it within 2^31 of xmax and the
// signed difference of the low 32 bits orders it correctly.
func stillRunning(snap string, xids []uint32) ([]uint32, error) {
	bad := func() error { return fmt.Errorf("parse snapshot %q: want xmin:xmax:xip,...", snap) }
	parts := strings.Split(snap, ":")
	if len(parts) != 3 {
		return nil, bad()
	}
	xmax, err := strconv.ParseUint(parts[1], 10, 64)
	if err != nil {
		return nil, bad()
	}
	xip := map[uint32]bool{}
	if parts[2] != "" {
		for _, f := range strings.Split(parts[2], ",") {
			x, err := strconv.ParseUint(f, 10, 64)
			if err != nil {
				return nil, bad()
			}
			xip[uint32(x)] = true
		}
	}
	var running []uint32
	for _, x := range xids {
		if xip[x] || int32(x-uint32(xmax)) >= 0 {
			running = append(running, x)
		}
	}
	return running, nil
}
