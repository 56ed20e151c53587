package preflight

import (
	"slices"
	"testing"
)

func TestCheckBounds(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkBounds)
	if in.r.Rows != 10 || !slices.Equal(in.r.Lo, []string{"1"}) || !slices.Equal(in.r.Hi, []string{"10"}) {
		t.Errorf("bounds: rows %d, keys %v to %v; want 10, 1 to 10", in.r.Rows, in.r.Lo, in.r.Hi)
	}
}
