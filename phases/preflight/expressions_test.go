package preflight

import (
	"testing"

	"github.com/cdcbackfill/cdcbackfill/config"
)

func TestCheckExpressions(t *testing.T) {
	in := inspect(t, usersTable, nil)
	run(t, in, checkExpressions)
	noFail(t, in.r)
	has(t, in.r, OK, "expression for first_name is valid SQL over the row, immutable")

	in = inspect(t, usersTable, func(c *config.Config) { c.Columns[0].Expr = "full_name || random()::text" })
	run(t, in, checkExpressions)
	has(t, in.r, Fail, "never reaches parity")
}
