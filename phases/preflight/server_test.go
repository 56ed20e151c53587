package preflight

import "testing"

func TestCheckServerFeatures(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkServerFeatures)
	noFail(t, in.r)
	has(t, in.r, OK, "stream: ")
}
