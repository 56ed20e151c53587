package phases

import (
	"context"
	"fmt"

	"github.com/cdcbackfill/cdcbackfill/internal/exprcheck"
)

// checkExpressions proves each expression is one expression of the row
// (exprcheck, PostgreSQL's parser), then lets PostgreSQL check it over the
// row by preparing a query.
func checkExpressions(ctx context.Context, in *inspection) (bool, error) {
	r, conn, t := in.r, in.conn, in.table
	allValid := true
	for _, c := range t.Columns {
		name := "expression for " + c.Name
		if _, err := exprcheck.Parse(c.Expr); err != nil {
			r.fail(name, fmt.Sprintf("columns.%s: %v", c.Name, err), "write a single SQL expression over the row, e.g. split_part(full_name, ' ', 1)")
			allValid = false
			continue
		}
		sd, err := conn.Prepare(ctx, "", "SELECT ("+c.Expr+") AS _cdcb_check FROM "+t.Ident()+" LIMIT 0")
		if err == nil && len(sd.Fields) != 1 {
			err = fmt.Errorf("it yields %d values, want 1", len(sd.Fields))
		}
		if err != nil {
			r.fail(name, fmt.Sprintf("columns.%s: %s", c.Name, err), "fix the expression: it must be valid SQL over the columns of "+t.Ident())
			allValid = false
			continue
		}
		r.ok(name + " is valid SQL over the row")
	}
	if allValid && len(t.MissingColumns()) == 0 {
		// Every target exists: prepare the real statements, which also
		// checks that each expression's type fits its column.
		for _, sql := range []string{t.RangeSQL(true), t.KeysSQL()} {
			if _, err := conn.Prepare(ctx, "", sql); err != nil {
				r.fail("recompute statement", err.Error(), "make each expression's type assignable to its column")
				return false, nil
			}
		}
		r.ok("recompute statement prepares")
	}
	return false, nil
}
