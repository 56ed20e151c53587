package phases

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
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

// addColumnRE and dropColumnRE find the columns a statement adds or drops.
var (
	addColumnRE  = regexp.MustCompile(`(?i)\bADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)`)
	dropColumnRE = regexp.MustCompile(`(?i)\bDROP\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)`)
)

// AddedColumns lists the column names the statements add.
func AddedColumns(stmts []string) map[string]bool {
	added := map[string]bool{}
	for _, name := range columnsNamed(addColumnRE, stmts, "constraint", "primary", "unique", "check", "foreign", "exclude") {
		added[name] = true
	}
	return added
}

// DroppedColumns lists the column names the statements drop.
func DroppedColumns(stmts []string) []string {
	return columnsNamed(dropColumnRE, stmts, "constraint", "default", "not", "index", "table", "view", "trigger", "expression", "identity")
}

// columnsNamed returns the identifiers re captures in the statements, as
// PostgreSQL reads them (quoted: as written; unquoted: folded to lower
// case), but for the keywords that can stand in their place.
func columnsNamed(re *regexp.Regexp, stmts []string, keywords ...string) []string {
	var out []string
	for _, s := range stmts {
		for _, m := range re.FindAllStringSubmatch(s, -1) {
			name := m[1]
			if strings.HasPrefix(name, `"`) {
				name = strings.ReplaceAll(name[1:len(name)-1], `""`, `"`)
			} else {
				name = strings.ToLower(name)
			}
			if !slices.Contains(keywords, strings.ToLower(name)) {
				out = append(out, name)
			}
		}
	}
	return out
}
