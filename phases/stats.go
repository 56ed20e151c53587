package phases

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/applier"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// pending returns the running applier's counts not yet folded into the
// saved ones, and its stats (zero without one); called with live.mu held.
func (d *Daemon) pending() (events, fixes uint64, s applier.Stats) {
	p := d.pipe.Load()
	if p == nil {
		return 0, 0, s
	}
	_, ap := p.current()
	if ap == nil {
		return 0, 0, s
	}
	d.live.follow(ap)
	s = ap.Stats()
	return s.Events - d.live.apEvents, s.Corrections - d.live.apFixes, s
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
		d.live.rate = smoothRate(d.live.rate, st.RowsDone-d.live.lastRows, now.Sub(d.live.lastAt))
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
	newEvents, newFixes, as := d.pending()
	d.live.apEvents += newEvents
	d.live.apFixes += newFixes
	d.live.savedEvents += newEvents
	d.live.savedFixes += newFixes
	lastCommit := as.LastCommitTime
	if as.Deferring {
		stats.DeferredKeys = as.PendingKeys
	}
	stats.CorrectionSamples = as.RecentCorrections
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
			l.savedEvidence += l.ap.Stats().Evidence
		}
		l.ap, l.apEvents, l.apFixes = ap, 0, 0
	}
}

// smoothRate folds rows done over dt into the rate (an exponential moving
// average: a batch landing in one tick and none in the next reads as a
// steady rate, not as a saw). A negative count (a backfill started over)
// or no time passed leave it as it is.
func smoothRate(rate float64, rows int64, dt time.Duration) float64 {
	if dt <= 0 || rows < 0 {
		return rate
	}
	return 0.7*rate + 0.3*float64(rows)/dt.Seconds()
}
