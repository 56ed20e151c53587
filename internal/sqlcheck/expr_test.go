package sqlcheck

import (
	"strings"
	"testing"
)

func TestExpression(t *testing.T) {
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
		{"", "empty"},
		{"a); DROP TABLE users; --", "unbalanced ')'"},
		{"lower(x); DROP TABLE users", "';'"},
		{"x -- hidden", "comment"},
		{"x /* hidden */", "comment"},
		{"lower((x)", "unbalanced '('"},
		{"'open", "unterminated string literal"},
		{"x) FROM t UNION SELECT (y", "unbalanced ')'"},
	}
	for _, c := range cases {
		err := Expression(c.expr)
		switch {
		case c.err == "" && err != nil:
			t.Errorf("%q: unexpected error %v", c.expr, err)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%q: error %v, want one containing %q", c.expr, err, c.err)
		}
	}
}
