package dbconn

import (
	"testing"
	"time"
)

// TestBackoff: the waits stay within [step/2, 3*step/2) of a step that
// doubles from Initial to Max, and Reset starts over.
func TestBackoff(t *testing.T) {
	b := NewBackoff(100*time.Millisecond, time.Second)
	steps := []time.Duration{100, 200, 400, 800, 1000, 1000}
	check := func(round int) {
		for i, s := range steps {
			step := s * time.Millisecond
			if got := b.Next(); got < step/2 || got >= step*3/2 {
				t.Errorf("round %d, try %d: wait %s outside [%s, %s)", round, i+1, got, step/2, step*3/2)
			}
		}
	}
	for round := 1; round <= 50; round++ {
		check(round)
		b.Reset()
	}
}
