package phases

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// sync keeps the new columns in sync from the stream until the
// application dual-writes: approved by an operator (manual) or proven by
// evidence (auto, see evidenceWatch). Then the application owns the new
// columns from a WAL position read at that moment (the hand-over), and the
// migration moves to verify.
func (d *Daemon) sync(ctx context.Context, st *state.Migration) error {
	if err := d.startPipeline(ctx); err != nil {
		return err
	}
	if st.HandoverLSN == nil {
		d.repl.setHandover(0)
	}
	d.log.Info("sync: the stream keeps the new columns in sync; waiting for dual-write", "detect", d.cfg.DualWrite.Detect)
	w := evidenceWatch{minEvidence: d.cfg.DualWrite.MinEvidence, period: d.cfg.DualWrite.QuietPeriod, syncSince: time.Now()}
	defer d.figures.dualWrite.Store(nil)
	return d.repl.pipe.Load().guard(ctx, func(ctx context.Context) error {
		for {
			if err := dbconn.Sleep(ctx, 200*time.Millisecond); err != nil {
				return nil
			}
			if d.control.paused.Load() {
				d.figures.waiting.Store("paused by operator: dual-write is neither detected nor taken from approve until resume")
				continue
			}
			if h := d.control.recordedHandover(); h != 0 {
				// approve recorded the hand-over in its own transaction:
				// the application has owned the new columns since then.
				return d.handOverAt(ctx, h)
			}
			switch d.cfg.DualWrite.Detect {
			case config.DetectManual:
				d.figures.waiting.Store("the application to dual-write: cdcbackfill approve once it does")
			case config.DetectAuto:
				if done, err := d.detectDualWrite(ctx, &w); done || err != nil {
					return err
				}
			}
		}
	})
}

// detectDualWrite looks at the stream's evidence of dual-write (detect
// auto); once it suffices, with the stream caught up and no correction
// meanwhile, the application owns the new columns from now. done says that
// sync ends with err.
func (d *Daemon) detectDualWrite(ctx context.Context, w *evidenceWatch) (done bool, err error) {
	ev, fixes, streamTime := d.evidence()
	dw := w.observe(time.Now(), ev, fixes, streamTime)
	d.figures.dualWrite.Store(&dw)
	d.figures.waiting.Store("evidence of dual-write: " + dw.Missing)
	if dw.Missing != "" {
		return false, nil
	}
	// Enough evidence in stream time; it counts only with the
	// stream caught up and no correction found meanwhile.
	ok, err := d.repl.pipe.Load().caughtUp(ctx, d.conn, 2*time.Second)
	if err != nil {
		return true, err // the conductor's connection, or the stream, is gone: start over
	}
	if !ok {
		d.figures.waiting.Store("evidence of dual-write suffices; the stream to catch up, to count it")
		d.rlog.Info("sync: the evidence of dual-write suffices; waiting for the stream to catch up")
		return false, nil
	}
	if _, now, _ := d.evidence(); now != fixes {
		d.rlog.Info("sync: a correction came while the stream caught up; the quiet period starts again")
		return false, nil
	}
	d.log.Info("sync: dual-write detected: application writes of the new columns needed no correction for the quiet period",
		"evidence", dw.Evidence, "quiet_period", d.cfg.DualWrite.QuietPeriod)
	lsn, err := d.store.HandOverNow(ctx, d.conn, map[string]any{"by": "evidence", "evidence": dw.Evidence,
		"quiet_period": d.cfg.DualWrite.QuietPeriod.String()})
	if err != nil {
		return true, err
	}
	d.repl.setHandover(lsn)
	d.log.Info("sync: the application owns the new columns from now on: the daemon checks them and never writes them", "handover_lsn", lsn)
	return true, nil
}

// handOverAt moves to verify with the hand-over approve recorded at lsn.
func (d *Daemon) handOverAt(ctx context.Context, lsn pglogrepl.LSN) error {
	d.repl.setHandover(lsn)
	d.log.Info("sync: dual-write approved: the application owns the new columns since the approval; the daemon checks them and never writes them", "handover_lsn", lsn)
	return d.store.HandOver(ctx, d.conn, lsn, map[string]any{"by": "approve"})
}

// evidence is the stream's evidence of dual-write so far: the count, the
// corrections, and the commit time of the last transaction received
// (stream time).
func (d *Daemon) evidence() (evidence, corrections uint64, streamTime time.Time) {
	d.figures.live.mu.Lock()
	defer d.figures.live.mu.Unlock()
	_, fixes, s := d.unsaved()
	return d.figures.live.savedEvidence + s.Evidence, d.figures.live.savedFixes + fixes, s.StreamTime
}

// evidenceWatch decides, from positive evidence only, that the application
// dual-writes: at least minEvidence application writes of the new columns
// (inserts that set them, updates that changed what they are computed
// from) whose rows needed no correction, and none that needed one, over a
// quiet period measured in stream time (commit timestamps). Silence is no
// evidence: an idle application, or one writing other columns, never
// passes.
type evidenceWatch struct {
	minEvidence int
	period      time.Duration
	syncSince   time.Time // wall clock, for "no application writes seen for ..."

	started     bool
	base        uint64    // evidence counted before the window
	fixes       uint64    // corrections seen
	windowStart time.Time // stream time the window began; zero until a transaction is seen
	cleanSince  time.Time // wall clock of the last correction (or sync's start)
}

func (w *evidenceWatch) observe(now time.Time, evidence, fixes uint64, streamTime time.Time) state.DualWrite {
	if !w.started || fixes != w.fixes {
		// The start, or a correction: the window starts again, at the
		// stream time the correction was seen.
		w.cleanSince = now
		if !w.started {
			w.cleanSince = w.syncSince
		}
		w.started, w.fixes, w.base, w.windowStart = true, fixes, evidence, streamTime
	}
	if w.windowStart.IsZero() {
		w.windowStart = streamTime // the first transaction seen
	}
	ev := evidence - w.base
	quiet := time.Duration(0)
	if !streamTime.IsZero() && !w.windowStart.IsZero() {
		quiet = max(streamTime.Sub(w.windowStart), 0)
	}
	dw := state.DualWrite{Evidence: ev, MinEvidence: w.minEvidence, QuietSeconds: quiet.Seconds(),
		QuietPeriodSeconds: w.period.Seconds()}
	switch {
	case ev == 0:
		dw.Missing = fmt.Sprintf("no application writes of the new columns seen for %s", now.Sub(w.cleanSince).Round(time.Second))
	case ev < uint64(w.minEvidence):
		dw.Missing = fmt.Sprintf("%d of %d writes seen", ev, w.minEvidence)
	case quiet < w.period:
		dw.Missing = fmt.Sprintf("quiet for %s of %s of stream time", quiet.Round(time.Second), w.period)
	}
	return dw
}
