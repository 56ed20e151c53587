package snapshot

import "time"

// sizerWindow is how many recent batches the Sizer remembers.
const sizerWindow = 5

// Sizer sizes a worker's batches so that they finish within the target
// time. It sizes from the slowest cost per row of the last sizerWindow
// batches, not from the last batch alone: once the table outgrows shared
// buffers, a batch's cost per row depends on how much of it was read from
// disk, and a size fitted to one cached batch overshoots the target with
// the next one that is not (at 1M rows with 2 workers, batch p99 was 245ms
// for a 200ms target while p50 was 128ms). It aims at 2/3 of the target:
// batch times vary, and the target bounds how long a batch holds its row
// locks, not their average.
type Sizer struct {
	target time.Duration
	size   int
	perRow [sizerWindow]float64 // ns per row of recent batches, a ring; 0: empty
	next   int
}

// NewSizer starts at first rows a batch; a target of 0 keeps that size.
func NewSizer(first int, target time.Duration) *Sizer {
	return &Sizer{target: target, size: first}
}

// Size is the size of the next batch.
func (s *Sizer) Size() int { return s.size }

// Observe records that the batch of Size() rows took took, and returns
// the size of the next one.
func (s *Sizer) Observe(took time.Duration) int {
	if s.target <= 0 || took <= 0 || s.size <= 0 {
		return s.size
	}
	s.perRow[s.next] = float64(took) / float64(s.size)
	s.next = (s.next + 1) % sizerWindow
	slowest := 0.0
	for _, p := range s.perRow {
		slowest = max(slowest, p)
	}
	// Down at once to what the slowest fits in the aim, up at most 4x a
	// step. Shrinking by half at most (the sizing before the Sizer) overshot the target
	// with every step of the way down when the cost per row rose tenfold
	// (a stripe of rows read from disk, or wide ones); a single outlier
	// (a lock wait) now costs sizerWindow small batches, not the target.
	ideal := float64(s.target) * 2 / 3 / slowest
	s.size = int(min(max(min(ideal, float64(s.size)*4), minBatch), maxBatch))
	return s.size
}
