package preflight

import "testing"

func TestCheckReplication(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkReplication)
	noFail(t, in.r)
	has(t, in.r, OK, "role may replicate")
	has(t, in.r, OK, "a replication slot is free")
}
