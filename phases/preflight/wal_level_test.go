package preflight

import "testing"

func TestCheckWALLevel(t *testing.T) {
	in := inspect(t, "", nil)
	run(t, in, checkWALLevel)
	has(t, in.r, OK, "wal_level is logical")
}
