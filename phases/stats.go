package phases

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cdcbackfill/cdcbackfill/applier"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// figures are what status and the HTTP window show of the daemon at work.
type figures struct {
	obs       *observer    // the HTTP window's, for the whole process
	waiting   atomic.Value // string: what the phase in hand waits for, for status
	dualWrite atomic.Pointer[state.DualWrite]
	live      live // published by the watcher
}

// live holds what the watcher publishes: progress rate and the counters not
// yet added to the state row.
type live struct {
	mu             sync.Mutex
	throttleReason func() string
	lastRows       int64
	lastAt         time.Time
	rate           float64 // rows/s, smoothed
	savedEvents    uint64  // stream events already added to the state row
	savedFixes     uint64  // corrections already added to the state row
	savedEvidence  uint64  // evidence of appliers that have ended
	ap             *applier.Applier
	apEvents       uint64 // the current applier's events already counted
	apFixes        uint64 // the current applier's corrections already counted
}

// unsaved returns the running applier's counts not yet folded into the
// saved ones, and its stats (zero without one); called with live.mu held.
func (d *Daemon) unsaved() (events, fixes uint64, s applier.Stats) {
	p := d.repl.pipe.Load()
	if p == nil {
		return 0, 0, s
	}
	_, ap := p.current()
	if ap == nil {
		return 0, 0, s
	}
	d.figures.live.follow(ap)
	s = ap.Stats()
	return s.Events - d.figures.live.apEvents, s.Corrections - d.figures.live.apFixes, s
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
func (d *Daemon) publishStatsOn(ctx context.Context, conn dbconn.Querier, st *state.Migration) {
	now := time.Now()
	d.figures.live.mu.Lock()
	if !d.figures.live.lastAt.IsZero() {
		d.figures.live.rate = smoothRate(d.figures.live.rate, st.RowsDone-d.figures.live.lastRows, now.Sub(d.figures.live.lastAt))
	}
	d.figures.live.lastRows, d.figures.live.lastAt = st.RowsDone, now
	stats := state.Stats{RowsPerSecond: d.figures.live.rate, HeartbeatAt: now.UTC().Format(time.RFC3339Nano),
		DualWrite: d.figures.dualWrite.Load(), Waiting: d.figures.waiting.Load().(string)}
	if st.Phase == state.Backfill && d.figures.live.rate > 1 && st.RowsTotal > st.RowsDone {
		stats.EtaSeconds = float64(st.RowsTotal-st.RowsDone) / d.figures.live.rate
	}
	if d.figures.live.throttleReason != nil && (st.Phase == state.Backfill || st.Phase == state.Verify) {
		stats.ThrottleReason = d.figures.live.throttleReason()
	}
	if st.Paused {
		stats.ThrottleReason = "paused by operator (cdcbackfill resume)"
	}
	newEvents, newFixes, as := d.unsaved()
	d.figures.live.apEvents += newEvents
	d.figures.live.apFixes += newFixes
	d.figures.live.savedEvents += newEvents
	d.figures.live.savedFixes += newFixes
	lastCommit := as.LastCommitTime
	if as.Deferring {
		stats.DeferredKeys = as.PendingKeys
	}
	stats.CorrectionSamples = as.RecentCorrections
	if stats.CorrectionSamples == nil {
		stats.CorrectionSamples = st.Stats.CorrectionSamples // keep the last known across restarts
	}
	d.figures.live.mu.Unlock()

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
