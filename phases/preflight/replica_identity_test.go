package preflight

import "testing"

func TestCheckReplicaIdentity(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkReplicaIdentity)
	has(t, in.r, OK, "replica identity")

	in = inspect(t, usersTable+"; ALTER TABLE users REPLICA IDENTITY NOTHING", nil)
	run(t, in, checkReplicaIdentity)
	has(t, in.r, Fail, "REPLICA IDENTITY DEFAULT")
}
