package preflight

import (
	"testing"

	"github.com/cdcbackfill/cdcbackfill/config"
)

func TestCheckStatements(t *testing.T) {
	// pg_stat_statements is not installed in the test's database.
	in := inspect(t, usersTable, nil)
	run(t, in, checkStatements)
	has(t, in.r, Info, "not watched")

	in = inspect(t, usersTable, func(c *config.Config) { c.Contract = nil })
	run(t, in, checkStatements)
	if len(in.r.Checks) != 0 {
		t.Errorf("nothing dropped, yet: %v", in.r.Checks)
	}
}
