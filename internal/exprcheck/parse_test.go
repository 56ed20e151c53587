package exprcheck

import (
	"errors"
	"strings"
	"testing"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

func TestParseShape(t *testing.T) {
	cases := []struct {
		expr, err string
	}{
		{"split_part(full_name, ' ', 1)", ""},
		{"coalesce(a, 'x;y')", ""},
		{`"Weird;Col" || '--'`, ""},
		{"$$a)b$$ || x", ""},
		{"$tag$ ; $tag$", ""},
		{"e'it\\'s' || x", ""},
		{"(a + b) * 2", ""},
		{"upper(x) /* a note */", ""},
		{"upper(x) -- a note\n", ""},
		{"CASE WHEN a THEN 'x' ELSE 'y' END", ""},
		{"(created_at AT TIME ZONE 'UTC')::date", ""},
		{"", "empty"},
		{"   ", "empty"},
		{"1) FROM x; DROP TABLE y; SELECT (1", "closes the parenthesis"},
		{"a); DROP TABLE users; --", "closes the parenthesis"},
		{"lower(x); DROP TABLE users", "';'"},
		{"x -- hidden", "-- comment"},
		{"lower((x)", "unbalanced '('"},
		{"'open", "does not parse"},
		{"x) FROM t UNION SELECT (y", "closes the parenthesis"},
		{"a) OR (b", "closes the parenthesis"},
		{"a) AS x, (b", "closes the parenthesis"},
		{"a b c", "does not parse"},
		{"$1 || x", "parameter $1"},
		{"(SELECT v FROM other WHERE id = 1) || x", "subquery"},
		{"x || coalesce((SELECT 1), 0)::text", "subquery"},
		{"EXISTS (SELECT 1)", "subquery"},
		{"x IN (SELECT y FROM other)", "subquery"},
		{"ARRAY(SELECT 1)", "subquery"},
	}
	for _, c := range cases {
		_, err := Parse(c.expr)
		switch {
		case c.err == "" && err != nil:
			t.Errorf("%q: unexpected error %v", c.expr, err)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%q: error %v, want one containing %q", c.expr, err, c.err)
		}
	}
	if _, err := Parse("(SELECT 1)"); !errors.Is(err, ErrSubquery) {
		t.Errorf("subquery: error %v, want ErrSubquery", err)
	}
}

// The tree itself refuses what adds to the statement, should the scanner's
// check ever let it through.
func TestOnlyTarget(t *testing.T) {
	cases := []struct {
		sql, err string
	}{
		{"SELECT (1)", ""},
		{"SELECT (1) FROM t", "adds a clause"},
		{"SELECT (1) WHERE true", "adds a clause"},
		{"SELECT (1) ORDER BY 1", "adds a clause"},
		{"SELECT (1) LIMIT 1", "adds a clause"},
		{"SELECT (1) UNION SELECT (2)", "yields 0 values"},
		{"SELECT (1) FOR UPDATE", "adds a clause"},
		{"SELECT DISTINCT (1)", "adds a clause"},
		{"SELECT (1), (2)", "yields 2 values"},
		{"SELECT (1) AS a", "not one expression"},
		{"SELECT 1; SELECT 2", "2 statements"},
		{"DROP TABLE t", "not an expression"},
		{"WITH w AS (SELECT 1) SELECT (1)", "adds a clause"},
	}
	for _, c := range cases {
		tree, err := pgParse(c.sql)
		if err != nil {
			t.Fatalf("%q: %v", c.sql, err)
		}
		_, err = onlyTarget(tree)
		switch {
		case c.err == "" && err != nil:
			t.Errorf("%q: unexpected error %v", c.sql, err)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%q: error %v, want one containing %q", c.sql, err, c.err)
		}
	}
}

func TestCallsAndDeparse(t *testing.T) {
	cases := []struct {
		expr  string
		calls []string // deparsed, parents first
	}{
		{"split_part(full_name, ' ', 1)", []string{"split_part(full_name, ' ', 1)"}},
		{"x", nil},
		{"created_at::text /* note */", []string{"created_at::text"}},
		{"upper(x) || random()::text", []string{"upper(x) || random()::text", "upper(x)", "random()::text", "random()"}},
		{"CURRENT_DATE", []string{"current_date"}},
	}
	for _, c := range cases {
		e, err := Parse(c.expr)
		if err != nil {
			t.Fatalf("%q: %v", c.expr, err)
		}
		var got []string
		for _, cl := range e.calls {
			s, err := deparse(cl.node)
			if err != nil {
				t.Fatalf("%q: %v", c.expr, err)
			}
			got = append(got, s)
		}
		if strings.Join(got, "|") != strings.Join(c.calls, "|") {
			t.Errorf("%q: calls %q, want %q", c.expr, got, c.calls)
		}
	}
	e, _ := Parse("upper(x) || random()::text")
	if e.calls[0].end != 4 || e.calls[1].end != 2 || e.calls[2].end != 4 || e.calls[3].end != 4 {
		t.Errorf("nesting: %+v", e.calls)
	}
}

func pgParse(sql string) (*pg_query.ParseResult, error) { return pg_query.Parse(sql) }
