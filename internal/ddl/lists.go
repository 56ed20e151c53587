package ddl

import (
	"fmt"

	"github.com/cdcbackfill/cdcbackfill/config"
)

// PlanFor reads a migration's expand and contract lists with the parser and
// plans what its new columns become (PlanFinish): the statements it takes
// over, and the lists as they run. server is server_version_num (0:
// unknown). The daemon, abort and plan all plan through it.
func PlanFor(cfg *config.Config, server int) (*Finish, error) {
	expand, err := parseList("expand", cfg.Expand)
	if err != nil {
		return nil, err
	}
	contract, err := parseList("contract", cfg.Contract)
	if err != nil {
		return nil, err
	}
	schema, name := cfg.TableIdent()
	return PlanFinish(expand, contract, Relation{Schema: schema, Name: name}, cfg.ColumnNames(), server)
}

// parseList parses every statement of a list, naming the first that fails
// by its place ("expand[2]: ...").
func parseList(list string, sqls []string) ([]*Statement, error) {
	out := make([]*Statement, len(sqls))
	for i, sql := range sqls {
		s, err := Parse(sql)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %w", list, i, err)
		}
		out[i] = s
	}
	return out, nil
}

// AddedColumns lists the column names the statements add, as PostgreSQL's
// parser reads them. A statement that does not parse adds nothing here;
// plan's DDL check reports it.
func AddedColumns(stmts []string) map[string]bool {
	added := map[string]bool{}
	for _, sql := range stmts {
		if s, err := Parse(sql); err == nil {
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
		if s, err := Parse(sql); err == nil {
			out = append(out, s.Dropped...)
		}
	}
	return out
}
