package preflight

import "testing"

func TestCheckState(t *testing.T) {
	in := inspect(t, "", nil)
	run(t, in, checkState)
	if in.r.State != nil || len(in.r.Checks) != 0 {
		t.Errorf("a migration never started: state %+v, lines %v", in.r.State, in.r.Checks)
	}
}
