package preflight

import "testing"

func TestCheckPrivileges(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkPrivileges)
	has(t, in.r, OK, "privileges: UPDATE, owner of the table, CREATE on the database")
}
