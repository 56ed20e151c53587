package dbconn

import (
	"math/rand/v2"
	"time"
)

// Backoff is exponential backoff with jitter, for a retry loop's waits.
// The step starts at Initial and doubles with every Next up to Max; each
// wait is drawn from [step/2, 3*step/2), so its mean is the step (the
// total time a number of tries takes is what it would be without jitter)
// while daemons that failed together do not retry in step.
type Backoff struct {
	Initial, Max time.Duration
	step         time.Duration
}

// NewBackoff returns a Backoff whose step starts at initial and stops
// doubling at max.
func NewBackoff(initial, max time.Duration) *Backoff {
	return &Backoff{Initial: initial, Max: max}
}

// Next returns the wait before the next try and doubles the step.
func (b *Backoff) Next() time.Duration {
	if b.step <= 0 {
		b.step = b.Initial
	}
	d := b.step
	b.step = min(2*b.step, b.Max)
	if d <= 0 {
		return 0
	}
	return d/2 + rand.N(d)
}

// Reset starts the steps over from Initial: what failed has worked again.
func (b *Backoff) Reset() { b.step = 0 }
