package phases

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/schollz/progressbar/v3"

	"github.com/cdcbackfill/cdcbackfill/config"
)

// Print renders the status for a person (`cdcbackfill status`): a progress
// bar with rows/s and ETA while a daemon runs, then the stream's and
// verify's figures, and what the phase waits for.
func (r *StatusReport) Print(w io.Writer) {
	state := "no daemon running"
	if r.Running {
		state = "daemon running"
	}
	if r.Paused {
		state += ", PAUSED"
	}
	fmt.Fprintf(w, "migration %s: phase %s (%s, since %s)\n", r.Name, r.Phase, state, r.PhaseStartedAt.Local().Format(time.DateTime))
	if r.Waiting != "" {
		fmt.Fprintf(w, "waiting for: %s\n", r.Waiting)
	}
	r.printBackfill(w)
	r.printSync(w)
	r.printVerify(w)
	if c := r.Contract.Cutover; c != nil {
		fmt.Fprintf(w, "contract: cut-over in %d tries; longest application stall %.1f ms (lock wait %.1f ms, held %.1f ms, %d keys checked under the lock)\n",
			c.Tries, c.LongestStallMS, c.LockWaitMS, c.HeldMS, c.KeysChecked)
	}
	if r.Throttle != "" {
		fmt.Fprintf(w, "throttled: %s\n", r.Throttle)
	}
	if r.Error != nil {
		fmt.Fprintf(w, "last error: %s\n", *r.Error)
	}
}

// printBackfill is the backfill's progress bar, with rows/s and ETA while
// a daemon runs.
func (r *StatusReport) printBackfill(w io.Writer) {
	total := max(r.Backfill.RowsTotal, r.Backfill.RowsDone, 1)
	var sb strings.Builder
	bar := progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(&sb),
		progressbar.OptionSetDescription("backfill"),
		progressbar.OptionSetWidth(30),
		progressbar.OptionShowCount(),
		progressbar.OptionThrottle(0),
	)
	_ = bar.Set64(r.Backfill.RowsDone)
	// The bar redraws with \r; only its last drawing is wanted here.
	drawn := sb.String()
	if i := strings.LastIndex(drawn, "\r"); i >= 0 {
		drawn = drawn[i+1:]
	}
	fmt.Fprint(w, strings.TrimSpace(drawn))
	if r.Running {
		// A rate and an ETA mean something only while a daemon works.
		fmt.Fprintf(w, "  %.0f rows/s", r.Backfill.RowsPerSecond)
		if r.Backfill.EtaSeconds > 0 {
			fmt.Fprintf(w, ", ETA %s", (time.Duration(r.Backfill.EtaSeconds) * time.Second).String())
		}
	}
	fmt.Fprintln(w)
}

// printSync is the stream's figures.
func (r *StatusReport) printSync(w io.Writer) {
	fmt.Fprintf(w, "sync: slot lag %s (%.1fs), events %d, corrections %d\n", units.BytesSize(float64(r.Sync.LagBytes)), r.Sync.LagSeconds, r.Sync.Events, r.Sync.Corrections)
	if r.Sync.Correction == config.CorrectionDeferred && r.Phase == "sync" {
		fmt.Fprintf(w, "      deferred corrections: %d keys waiting, the oldest %.1fs (sync.defer_for %s)\n", r.Sync.DeferredKeys, r.Sync.LagSeconds,
			(time.Duration(r.Sync.DeferFor * float64(time.Second))).String())
	}
	if len(r.Sync.CorrectionSamples) > 0 {
		fmt.Fprintf(w, "      recent corrections (the application does not write these as the expressions say): %s\n", strings.Join(r.Sync.CorrectionSamples, " "))
	}
	if dw := r.Sync.DualWrite; dw != nil {
		fmt.Fprintf(w, "      dual-write evidence: %d of %d writes, quiet %s of %s (stream time)\n", dw.Evidence, dw.MinEvidence,
			(time.Duration(dw.QuietSeconds) * time.Second).String(), (time.Duration(dw.QuietPeriodSeconds) * time.Second).String())
	}
}

// printVerify is verify's figures and the rows out of parity.
func (r *StatusReport) printVerify(w io.Writer) {
	v := r.Verify
	fmt.Fprintf(w, "verify: rows checked %d, out of parity now %d (found %d, accepted %d), hold proven %s of %s\n",
		v.RowsChecked, v.Mismatches, v.MismatchesFound, v.Accepted,
		(time.Duration(v.HoldProven) * time.Second).String(), (time.Duration(v.Hold) * time.Second).String())
	for _, m := range v.MismatchSamples {
		fmt.Fprintf(w, "      %s\n", m)
	}
	if v.PrematureDetections > 0 {
		fmt.Fprintf(w, "      premature dual-write detections: %d (each sent the migration back to sync)\n", v.PrematureDetections)
	}
	for _, u := range v.OldColumnStatements {
		fmt.Fprintf(w, "      still uses the old column: %q (%d calls during the hold)\n", u.Query, u.Calls)
	}
}
