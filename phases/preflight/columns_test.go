package preflight

import (
	"testing"

	"github.com/cdcbackfill/cdcbackfill/config"
)

func TestCheckColumns(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkColumns)
	has(t, in.r, OK, "column first_name is added by expand")

	in = inspect(t, usersTable, func(c *config.Config) { c.Expand = nil })
	run(t, in, checkColumns)
	has(t, in.r, Fail, "neither exists in")
}
