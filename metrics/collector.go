package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// phaseNames are the daemon's phases (phases.Expand ... phases.Aborted);
// each gets a series so an alert can compare against 0 as well as 1.
var phaseNames = []string{"expand", "backfill", "sync", "verify", "contract", "done", "aborted"}

// collector asks the Source on every scrape, so the numbers are never older
// than the scrape and nothing has to keep gauges in step with the daemon.
type collector struct {
	src     Source
	timeout time.Duration

	phase, paused, leader                                      *prometheus.Desc
	rowsDone, rowsTotal, rowsPerSecond, etaSeconds             *prometheus.Desc
	slotLagBytes, applyLagSeconds, streamEvents, corrections   *prometheus.Desc
	verifyRowsChecked, verifyMismatches, throttled, ddlRetries *prometheus.Desc
	mismatchesFound, premature, evidence, holdProven, stall    *prometheus.Desc
	deferredKeys                                               *prometheus.Desc
}

func newCollector(src Source, timeout time.Duration) *collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("cdcbackfill_"+name, help, labels, nil)
	}
	return &collector{
		src:     src,
		timeout: timeout,
		phase: d("phase", "1 for the phase the migration is in, 0 for the others. "+
			"Alert when it stays in one phase longer than planned, or reaches aborted.", "phase"),
		paused: d("paused", "1 while an operator has paused the migration (cdcbackfill pause). "+
			"Alert when it stays paused: the slot keeps holding WAL back meanwhile."),
		leader: d("leader", "1 when this daemon holds the migration's lock and does the work, 0 while it waits as a standby. "+
			"Alert when no daemon reports 1: nobody is migrating."),
		rowsDone: d("backfill_rows_done", "Rows the backfill has covered so far. "+
			"Alert when it stops rising in the backfill phase while not paused or throttled."),
		rowsTotal: d("backfill_rows_total", "Rows the backfill plan covers: the denominator of progress."),
		rowsPerSecond: d("backfill_rows_per_second", "Recent backfill rate. "+
			"Alert when it drops to 0 in the backfill phase while not paused or throttled."),
		etaSeconds: d("backfill_eta_seconds", "Seconds until the backfill finishes at the recent rate. "+
			"Alert when it runs past the maintenance window."),
		slotLagBytes: d("slot_lag_bytes", "WAL bytes the migration's slot holds back; alert when it grows: "+
			"a stopped daemon's slot fills the disk."),
		applyLagSeconds: d("apply_lag_seconds", "Seconds between a write's commit and the daemon recomputing its row. "+
			"Alert when it grows: the new columns fall behind the writers."),
		deferredKeys: d("deferred_keys", "Changed rows whose correction waits (sync.correction deferred), the oldest apply_lag_seconds old. "+
			"Alert when apply_lag_seconds passes sync.defer_for by much: the bulk corrections do not keep up."),
		streamEvents: d("stream_events_total", "Row changes read from the replication stream. "+
			"Alert when it stops rising while the application writes: the stream has stalled."),
		corrections: d("corrections_total", "Rows the sync rewrote because a writer left their new columns stale. "+
			"Alert when it still rises after approve: some writer does not dual-write yet."),
		verifyRowsChecked: d("verify_rows_checked", "Rows the verify phase has compared with their expressions."),
		verifyMismatches: d("verify_mismatches", "Rows whose new columns differ from their expressions now, while the application owns them, not accepted. "+
			"They are never overwritten and hold the contract. Alert on anything above 0: the application writes values its expressions disagree with."),
		mismatchesFound: d("mismatches_found_total", "Rows ever found out of parity while the application owned the new columns."),
		premature: d("premature_detections_total", "Auto-detected dual-writes that a later correction proved premature (each sent the migration back to sync). "+
			"Alert when it rises: part of the application still runs the old release."),
		evidence:   d("dual_write_evidence", "Application writes of the new columns that needed no correction, in the current window (sync, detect auto)."),
		holdProven: d("hold_proven_seconds", "Time parity has been proven clean with the stream caught up, toward contract_policy.hold."),
		stall:      d("cutover_stall_seconds", "The contract cut-over's longest application stall: from asking for the table's lock to releasing it."),
		throttled: d("throttled", "1 with the reason while the backfill is throttled (replica lag, slot lag, rate cap), "+
			"0 with reason=\"\" otherwise. Alert when it stays 1: the backfill is not advancing.", "reason"),
		ddlRetries: d("ddl_retries_total", "DDL statements retried after lock_timeout because another session held the table. "+
			"Alert when it rises fast: a long transaction blocks expand or contract."),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.phase, c.paused, c.leader,
		c.rowsDone, c.rowsTotal, c.rowsPerSecond, c.etaSeconds,
		c.slotLagBytes, c.applyLagSeconds, c.streamEvents, c.corrections,
		c.verifyRowsChecked, c.verifyMismatches, c.throttled, c.ddlRetries,
		c.mismatchesFound, c.premature, c.evidence, c.holdProven, c.stall, c.deferredKeys,
	} {
		ch <- d
	}
}

// Collect reports a failing Source as an invalid metric: the scrape fails
// (Prometheus records up=0) rather than serving numbers nobody vouches for.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	s, err := c.src(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.phase, err)
		return
	}

	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v int64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v))
	}

	known := false
	for _, p := range phaseNames {
		gauge(c.phase, boolValue(p == s.Phase), p)
		known = known || p == s.Phase
	}
	if !known && s.Phase != "" { // a phase this package does not know yet still shows up
		gauge(c.phase, 1, s.Phase)
	}
	gauge(c.paused, boolValue(s.Paused))
	gauge(c.leader, boolValue(s.Leader))
	gauge(c.rowsDone, float64(s.RowsDone))
	gauge(c.rowsTotal, float64(s.RowsTotal))
	gauge(c.rowsPerSecond, s.RowsPerSecond)
	gauge(c.etaSeconds, s.EtaSeconds)
	gauge(c.slotLagBytes, float64(s.SlotLagBytes))
	gauge(c.applyLagSeconds, s.ApplyLagSeconds)
	gauge(c.deferredKeys, float64(s.DeferredKeys))
	counter(c.streamEvents, s.StreamEvents)
	counter(c.corrections, s.Corrections)
	gauge(c.verifyRowsChecked, float64(s.VerifyRowsChecked))
	gauge(c.verifyMismatches, float64(s.VerifyMismatches))
	gauge(c.throttled, boolValue(s.ThrottleReason != ""), s.ThrottleReason)
	counter(c.ddlRetries, s.DDLRetries)
	counter(c.mismatchesFound, s.MismatchesFound)
	counter(c.premature, s.PrematureDetections)
	gauge(c.evidence, float64(s.DualWriteEvidence))
	gauge(c.holdProven, s.HoldProvenSeconds)
	gauge(c.stall, s.CutoverStallSeconds)
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
