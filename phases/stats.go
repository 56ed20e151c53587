package phases

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/applier"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// totalEvents and totalCorrections are the stream's figures since this
// daemon started, across pipeline restarts.
func (d *Daemon) totalEvents() uint64 {
	d.live.mu.Lock()
	defer d.live.mu.Unlock()
	return d.live.savedEvents + d.pendingEvents()
}

func (d *Daemon) totalCorrections() uint64 {
	d.live.mu.Lock()
	defer d.live.mu.Unlock()
	return d.live.savedFixes + d.pendingFixes()
}

// pendingEvents and pendingFixes are the current applier's counts not yet
// folded into saved*; called with live.mu held.
func (d *Daemon) pendingEvents() uint64 {
	p := d.pipe.Load()
	if p == nil {
		return 0
	}
	_, ap := p.current()
	if ap == nil {
		return 0
	}
	d.live.follow(ap)
	return ap.Stats().Events - d.live.apEvents
}

func (d *Daemon) pendingFixes() uint64 {
	p := d.pipe.Load()
	if p == nil {
		return 0
	}
	_, ap := p.current()
	if ap == nil {
		return 0
	}
	d.live.follow(ap)
	return ap.Stats().Corrections - d.live.apFixes
}

// publishStats writes the live figures once more (at exit).
func (d *Daemon) publishStats(ctx context.Context) {
	st, err := d.store.Load(ctx, d.conn)
	if err == nil {
		d.publishStatsOn(ctx, d.conn, st)
	}
}

// publishStatsOn writes rows/s, ETA, lag, throttle reason and the stream's
// new counts into the state row.
func (d *Daemon) publishStatsOn(ctx context.Context, conn *pgx.Conn, st *state.Migration) {
	now := time.Now()
	d.live.mu.Lock()
	if !d.live.lastAt.IsZero() {
		dt := now.Sub(d.live.lastAt).Seconds()
		if dt > 0 && st.RowsDone >= d.live.lastRows {
			inst := float64(st.RowsDone-d.live.lastRows) / dt
			d.live.rate = 0.7*d.live.rate + 0.3*inst
		}
	}
	d.live.lastRows, d.live.lastAt = st.RowsDone, now
	stats := state.Stats{RowsPerSecond: d.live.rate, HeartbeatAt: now.UTC().Format(time.RFC3339Nano),
		DualWrite: d.dualWrite.Load(), Waiting: d.waiting.Load().(string)}
	if st.Phase == state.Backfill && d.live.rate > 1 && st.RowsTotal > st.RowsDone {
		stats.EtaSeconds = float64(st.RowsTotal-st.RowsDone) / d.live.rate
	}
	if d.live.throttleReason != nil && (st.Phase == state.Backfill || st.Phase == state.Verify) {
		stats.ThrottleReason = d.live.throttleReason()
	}
	if st.Paused {
		stats.ThrottleReason = "paused by operator (cdcbackfill resume)"
	}
	newEvents, newFixes := d.pendingEvents(), d.pendingFixes()
	d.live.apEvents += newEvents
	d.live.apFixes += newFixes
	d.live.savedEvents += newEvents
	d.live.savedFixes += newFixes
	var lastCommit time.Time
	if p := d.pipe.Load(); p != nil {
		if _, ap := p.current(); ap != nil {
			as := ap.Stats()
			lastCommit, stats.CorrectionSamples = as.LastCommitTime, as.RecentCorrections
		}
	}
	if stats.CorrectionSamples == nil {
		stats.CorrectionSamples = st.Stats.CorrectionSamples // keep the last known across restarts
	}
	d.live.mu.Unlock()

	if info, err := snapshot.LookupSlot(ctx, conn, d.cfg.SlotName()); err == nil && info.Exists {
		stats.LagBytes = info.LagBytes
		if !lastCommit.IsZero() && info.LagBytes > 0 {
			stats.LagSeconds = now.Sub(lastCommit).Seconds()
		}
	}
	if err := d.store.PublishStats(ctx, conn, stats, int64(newEvents), int64(newFixes)); err != nil && ctx.Err() == nil {
		d.rlog.Warn("publish status", "err", err)
	}
}

// follow starts counting afresh when the pipeline restarted with a new
// applier; the evidence of the one that ended is kept.
func (l *live) follow(ap *applier.Applier) {
	if l.ap != ap {
		if l.ap != nil {
			l.savedEvidence += l.ap.Stats().Evidence - l.apEvidence
		}
		l.ap, l.apEvents, l.apFixes, l.apEvidence = ap, 0, 0, 0
	}
}
