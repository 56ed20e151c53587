package preflight

import (
	"context"
	"fmt"

	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
)

func checkColumns(_ context.Context, in *inspection) (bool, error) {
	r, cfg, t := in.r, in.cfg, in.table
	added := ddl.AddedColumns(cfg.Expand)
	for _, c := range t.Columns {
		switch {
		case t.Exists[c.Name]:
			r.ok(fmt.Sprintf("column %s exists", c.Name))
		case added[c.Name]:
			r.ok(fmt.Sprintf("column %s is added by expand", c.Name))
		default:
			r.fail("column "+c.Name, fmt.Sprintf("column %q neither exists in %s nor is added by an expand statement", c.Name, t.Ident()),
				fmt.Sprintf("add it in expand: ALTER TABLE %s ADD COLUMN %s <type>", t.Ident(), c.Name))
		}
	}
	return false, nil
}
