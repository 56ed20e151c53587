package applier

import (
	"time"

	"github.com/cdcbackfill/cdcbackfill/cdc"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// isEvidence says whether a change shows the application writing the new
// columns itself: an insert that set them, or an update that changed a
// source column (known from the old row version where the server sends it,
// else from the source image last seen for the key). An update of other
// columns says nothing: the row was in parity before and stays so whoever
// wrote it.
func (a *Applier) isEvidence(key recompute.Key, im cdc.Image) bool {
	if im.Source == 0 {
		return im.Op == cdc.OpInsert && im.Written
	}
	c := key.ID()
	prev, seen := a.sources[c]
	if !seen && len(a.sources) >= sourceMemory {
		for k := range a.sources { // forget one, any one
			delete(a.sources, k)
			break
		}
	}
	a.sources[c] = im.Source
	switch im.Op {
	case cdc.OpInsert:
		return im.Written
	case cdc.OpUpdate:
		if im.OldSource != 0 {
			return im.OldSource != im.Source
		}
		return seen && prev != im.Source
	}
	return false
}

// countEvidence credits a statement's evidence-bearing keys when it
// corrected nothing; a statement that corrected rows instead moves the time
// of the last correction. Keys come back from SQL printed by PostgreSQL,
// which need not match the stream's text, so the statement, not the key, is
// the unit: a mixed statement counts as a correction only.
func (a *Applier) countEvidence(chunk []*bufferedKey, res recompute.Result) {
	if res.Corrected > 0 {
		var latest time.Time
		for _, p := range chunk {
			latest = maxTime(latest, p.lastTime)
		}
		if !latest.IsZero() && latest.UnixNano() > a.correctedAt.Load() {
			a.correctedAt.Store(latest.UnixNano())
		}
		return
	}
	skipped := make(map[string]bool, len(res.Skipped))
	for _, k := range res.Skipped {
		skipped[k.ID()] = true
	}
	var n uint64
	for _, p := range chunk {
		if p.evidence && !skipped[p.key.ID()] {
			n++
		}
	}
	a.evidence.Add(n)
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
