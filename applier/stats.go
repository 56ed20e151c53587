package applier

import (
	"slices"
	"time"

	"github.com/jackc/pglogrepl"
)

// Stats are the applier's counters since New.
type Stats struct {
	Events      uint64 // events received, of any kind and relation
	Corrections uint64 // rows whose new columns were written
	Flushes     uint64 // recompute rounds over the buffer
	Retries     uint64 // keys found held by another transaction, kept for the next flush (one per key per flush)
	// LockedFlushes counts statements that locked rows ahead: a row was
	// held past recompute.FastLockTimeout, or held rows were being passed over.
	LockedFlushes uint64
	// VisibilityWaits counts flushes that found a transaction of their keys
	// committed in WAL but still running (not yet visible to a snapshot) and
	// waited for it before recomputing.
	VisibilityWaits uint64
	ConfirmedLSN    pglogrepl.LSN // as ConfirmedLSN
	// LastCommitTime is the commit time of the last transaction fully
	// applied when nothing waits, else of the oldest transaction with keys
	// still waiting: time.Since(LastCommitTime) is how old the oldest
	// unapplied change is. Zero before the first transaction.
	LastCommitTime time.Time
	PendingKeys    int // keys in the buffer
	// RecentCorrections are a few of the last keys whose new columns the
	// applier had to write, newest first: where the application does not
	// (yet) dual-write as the expressions say.
	RecentCorrections []string
	// Evidence counts application changes that show it writing the new
	// columns itself (an insert that set them, an update that changed a
	// source column) and whose rows needed no correction: counted per
	// statement, only where the statement corrected nothing.
	Evidence uint64
	// LastCorrectionTime is the commit time of the latest transaction in a
	// statement that had to correct rows (zero: none yet).
	LastCorrectionTime time.Time
	// StreamTime is the commit time of the last transaction received.
	StreamTime time.Time
	// Checked and Mismatches count the keys checked, and found out of
	// parity, while the application owns the new columns.
	Checked, Mismatches uint64
	// Handover is the position from which the application owns the new
	// columns (0: the expressions own them).
	Handover pglogrepl.LSN
	// Deferring: corrections wait up to Config.Defer (the deferred mode,
	// before the hand-over); PendingKeys is then the backlog, and
	// LastCommitTime its oldest change.
	Deferring bool
}

// maxRecent bounds Stats.RecentCorrections.
const maxRecent = 10

// Stats returns the counters.
func (a *Applier) Stats() Stats {
	st := Stats{
		Events:          a.events.Load(),
		Corrections:     a.corrections.Load(),
		Flushes:         a.flushes.Load(),
		Retries:         a.retries.Load(),
		LockedFlushes:   a.lockedFlushes.Load(),
		VisibilityWaits: a.visWaits.Load(),
		ConfirmedLSN:    a.ConfirmedLSN(),
		PendingKeys:     int(a.pendingKeys.Load()),
	}
	if ns := a.commitTime.Load(); ns != 0 {
		st.LastCommitTime = time.Unix(0, ns)
	}
	if ns := a.correctedAt.Load(); ns != 0 {
		st.LastCorrectionTime = time.Unix(0, ns)
	}
	if ns := a.streamTime.Load(); ns != 0 {
		st.StreamTime = time.Unix(0, ns)
	}
	st.Evidence, st.Checked, st.Mismatches = a.evidence.Load(), a.checked.Load(), a.mismatches.Load()
	st.Handover = pglogrepl.LSN(a.handover.Load())
	st.Deferring = a.deferring()
	a.mu.Lock()
	st.RecentCorrections = slices.Clone(a.recent)
	a.mu.Unlock()
	return st
}
