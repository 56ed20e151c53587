package config

import (
	"fmt"
	"net"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

var (
	nameRE   = regexp.MustCompile(`^[a-z0-9_]{1,40}$`)
	columnRE = regexp.MustCompile(`^[a-z_][a-z0-9_]*$`)
	// slotNameRE is what PostgreSQL accepts as a slot name.
	slotNameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)
)

// maxIdentLen is PostgreSQL's NAMEDATALEN-1.
const maxIdentLen = 63

// Validate checks every value of c and returns an *Error listing every
// problem, one per line, or nil. Load calls it; call it yourself on a Config
// built in code (start from Default()).
func (c *Config) Validate() error {
	if ps := c.problems(); len(ps) > 0 {
		return &Error{Problems: ps}
	}
	return nil
}

// problems checks first the keys whose rules are their own, in key order.
func (c *Config) problems() []Problem {
	var ps []Problem
	add := func(key, format string, a ...any) {
		ps = append(ps, Problem{Key: key, Msg: fmt.Sprintf(format, a...)})
	}

	switch {
	case c.Name == "":
		add("name", "is required: 1 to 40 characters from a-z, 0-9 and _ (it names the replication slot, publication and state row)")
	case !nameRE.MatchString(c.Name):
		add("name", "must match ^[a-z0-9_]{1,40}$ (lowercase letters, digits, underscores; at most 40), got %q", c.Name)
	}

	if strings.TrimSpace(c.Database.DSN) == "" {
		add("database.dsn", "is required: a PostgreSQL connection string such as postgres://user@host:5432/db (or set %s)", EnvVar("database.dsn"))
	} else if msg := dbconn.CheckDSN(c.Database.DSN); msg != "" {
		add("database.dsn", "is not a valid PostgreSQL connection string: %s, got %q", msg, dbconn.RedactDSN(c.Database.DSN))
	}

	if c.Table == "" {
		add("table", `is required: the table to migrate, as "table" or "schema.table"`)
	} else if _, _, err := parseTable(c.Table); err != nil {
		add("table", `must be "table" or "schema.table" (identifiers, double-quoted if needed): %s, got %q`, err, c.Table)
	}

	if len(c.Columns) == 0 {
		add("columns", "is required: %s, such as first_name: split_part(full_name, ' ', 1)", wantColumns)
	}
	seen := map[string]bool{}
	for _, col := range c.Columns {
		key := "columns." + col.Name
		switch {
		case col.Name == "":
			add("columns", "a column name is empty")
		case !columnRE.MatchString(col.Name) || len(col.Name) > maxIdentLen:
			add(key, "is not a valid column name: must be a lowercase identifier matching [a-z_][a-z0-9_]* of at most %d characters", maxIdentLen)
		case seen[col.Name]:
			add(key, "is set twice")
		}
		seen[col.Name] = true
		if strings.TrimSpace(col.Expr) == "" {
			add(key, "must be a non-empty SQL expression that computes the column from the same row")
		}
	}
	if len(c.Contract) > 0 && len(c.Columns) == 0 {
		add("contract", "needs columns to be set: contract runs only after the new columns are backfilled and in sync")
	}

	if c.HTTP.Listen != "" {
		if err := checkListen(c.HTTP.Listen); err != "" {
			add("http.listen", `must be host:port such as 127.0.0.1:9187 or :9187 (or "" to disable the HTTP server): %s, got %q`, err, c.HTTP.Listen)
		}
	}

	// The other rules follow from a key's type and check tag.
	for _, k := range keys {
		v := reflect.ValueOf(c).Elem().FieldByIndex(k.index)
		if k.typ == statementsType {
			for i, s := range v.Interface().([]string) {
				if strings.TrimSpace(s) == "" {
					add(fmt.Sprintf("%s[%d]", k.name, i), "must be a non-empty SQL statement")
				}
			}
		} else if k.typ == slotNamesType {
			for i, name := range v.Interface().(SlotNames) {
				if !slotNameRE.MatchString(name) {
					add(fmt.Sprintf("%s[%d]", k.name, i), "must be a replication slot name (lowercase letters, digits and _, at most %d), got %q", maxIdentLen, name)
				}
			}
		} else if msg := k.problem(v); msg != "" {
			add(k.name, "%s", msg)
		}
	}
	sortProblems(ps)
	return ps
}

func checkListen(s string) string {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		if ae, ok := err.(*net.AddrError); ok {
			return ae.Err
		}
		return err.Error()
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return "the port must be a number from 0 to 65535"
	}
	return ""
}

// TableIdent returns the schema and table of c.Table, unquoted and ready to
// be quoted as identifiers (e.g. pgx.Identifier{schema, table}.Sanitize()).
// The schema defaults to "public". Unquoted names fold to lower case as in
// PostgreSQL; double-quoted ones keep their case. Meaningful only for a
// validated Config; for an invalid table it returns ("public", c.Table).
func (c *Config) TableIdent() (schema, table string) {
	s, t, err := parseTable(c.Table)
	if err != nil {
		return "public", c.Table
	}
	return s, t
}

// QuotedTable is TableIdent quoted for SQL: "schema"."table".
func (c *Config) QuotedTable() string {
	s, t := c.TableIdent()
	return pgx.Identifier{s, t}.Sanitize()
}

// parseTable splits "table", "schema.table", `"Schema"."Table"`.
func parseTable(s string) (schema, table string, err error) {
	first, rest, err := parseIdent(s)
	if err != nil {
		return "", "", err
	}
	if rest == "" {
		return "public", first, nil
	}
	if rest[0] != '.' {
		return "", "", fmt.Errorf("unexpected %q after %q", rest, first)
	}
	second, rest, err := parseIdent(rest[1:])
	if err != nil {
		return "", "", err
	}
	if rest != "" {
		return "", "", fmt.Errorf("unexpected %q after the table name", rest)
	}
	return first, second, nil
}

// parseIdent reads one identifier from the start of s.
func parseIdent(s string) (ident, rest string, err error) {
	if s == "" {
		return "", "", fmt.Errorf("a name is missing")
	}
	if s[0] == '"' {
		var b strings.Builder
		for i := 1; i < len(s); i++ {
			if s[i] != '"' {
				b.WriteByte(s[i])
				continue
			}
			if i+1 < len(s) && s[i+1] == '"' {
				b.WriteByte('"')
				i++
				continue
			}
			id := b.String()
			switch {
			case id == "":
				return "", "", fmt.Errorf("a quoted name is empty")
			case len(id) > maxIdentLen:
				return "", "", fmt.Errorf("%q is longer than %d bytes", id, maxIdentLen)
			case strings.ContainsRune(id, 0):
				return "", "", fmt.Errorf("a name holds a NUL byte")
			}
			return id, s[i+1:], nil
		}
		return "", "", fmt.Errorf("a quoted name is not closed")
	}
	isStart := func(c byte) bool { return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= 0x80 }
	isPart := func(c byte) bool { return isStart(c) || c >= '0' && c <= '9' || c == '$' }
	if !isStart(s[0]) {
		return "", "", fmt.Errorf("a name must start with a letter or _")
	}
	i := 1
	for i < len(s) && isPart(s[i]) {
		i++
	}
	id := strings.Map(func(r rune) rune { // ASCII fold, as PostgreSQL does for unquoted names
		if r >= 'A' && r <= 'Z' {
			return r + 'a' - 'A'
		}
		return r
	}, s[:i])
	if len(id) > maxIdentLen {
		return "", "", fmt.Errorf("%q is longer than %d bytes", id, maxIdentLen)
	}
	return id, s[i:], nil
}
