package phases

import (
	"context"
	"fmt"

	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
)

func checkColumns(_ context.Context, in *inspection) (bool, error) {
	r, cfg, t := in.r, in.cfg, in.table
	added := AddedColumns(cfg.Expand)
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

// AddedColumns lists the column names the statements add, as PostgreSQL's
// parser reads them. A statement that does not parse adds nothing here;
// the DDL check reports it.
func AddedColumns(stmts []string) map[string]bool {
	added := map[string]bool{}
	for _, sql := range stmts {
		if s, err := ddl.Parse(sql); err == nil {
			for _, c := range s.Added {
				added[c] = true
			}
		}
	}
	return added
}

// DroppedColumns lists the column names the statements drop.
func DroppedColumns(stmts []string) []string {
	var out []string
	for _, sql := range stmts {
		if s, err := ddl.Parse(sql); err == nil {
			out = append(out, s.Dropped...)
		}
	}
	return out
}
