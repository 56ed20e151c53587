package phases

import (
	"context"
	"time"
)

// sync keeps the new columns in sync from the stream until the
// application dual-writes: approved by an operator (manual) or seen as a
// quiet period with application changes and no correction (auto).
func (d *Daemon) sync(ctx context.Context, st *State) error {
	if err := d.startPipeline(ctx); err != nil {
		return err
	}
	d.log.Info("sync: the stream keeps the new columns in sync; waiting for dual-write", "detect", d.cfg.DualWrite.Detect)
	q := quietWatch{period: d.cfg.DualWrite.QuietPeriod}
	return d.pipe.Load().guard(ctx, func(ctx context.Context) error {
		for {
			if err := sleep(ctx, 200*time.Millisecond); err != nil {
				return nil
			}
			switch d.cfg.DualWrite.Detect {
			case "manual":
				if d.approved.Load() == Sync {
					return d.store.SetPhase(ctx, d.conn, Sync, Verify, map[string]any{"by": "approve"})
				}
			case "auto":
				if q.quiet(time.Now(), d.totalEvents(), d.totalCorrections()) {
					d.log.Info("sync: dual-write detected: the application's changes needed no correction for the quiet period",
						"quiet_period", d.cfg.DualWrite.QuietPeriod)
					return d.store.SetPhase(ctx, d.conn, Sync, Verify, map[string]any{"by": "quiet period", "quiet_period": d.cfg.DualWrite.QuietPeriod.String()})
				}
			}
		}
	})
}

// quietWatch decides that the application dual-writes: for a whole
// period, the stream saw application changes and none needed a correction.
type quietWatch struct {
	period      time.Duration
	since       time.Time
	events      uint64
	corrections uint64
}

func (q *quietWatch) quiet(now time.Time, events, corrections uint64) bool {
	if q.since.IsZero() || corrections != q.corrections {
		q.since, q.events, q.corrections = now, events, corrections
		return false
	}
	return now.Sub(q.since) >= q.period && events > q.events
}
