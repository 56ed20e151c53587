package preflight

import (
	"testing"

	"github.com/cdcbackfill/cdcbackfill/config"
)

func TestCheckDDL(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkDDL)
	noFail(t, in.r)
	has(t, in.r, OK, "expand[0] ALTER TABLE")

	in = inspect(t, usersTable, func(c *config.Config) { c.Expand = append(c.Expand, "ALTER TABLE users ADD COLUMN") })
	run(t, in, checkDDL)
	has(t, in.r, Fail, "expand[1]")

	in = inspect(t, usersTable, func(c *config.Config) { c.DDL.Allow = []string{"no-such-rule"} })
	run(t, in, checkDDL)
	has(t, in.r, Fail, "is no rule")
}
