package phases

import (
	"fmt"
	"sort"
	"strings"

	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// columnValues is one new column of a row out of parity: what it holds and
// what its expression gives.
type columnValues struct {
	name             string
	actual, expected *string
	notNull          bool // the migration makes the column NOT NULL
}

// renderMismatch renders the columns of a row out of parity that differ
// from their expressions, or are NULL where the migration makes them NOT
// NULL: first_name="Mary Ann" (expression "Mary"). The log and status both
// print rows this way.
func renderMismatch(cols []columnValues) string {
	parts := make([]string, 0, len(cols))
	for _, c := range cols {
		a, e := textOrNull(c.actual), textOrNull(c.expected)
		switch {
		case c.notNull && c.actual == nil:
			parts = append(parts, fmt.Sprintf("%s=NULL (must not be NULL: the migration makes %s NOT NULL; expression %s)", c.name, c.name, e))
		case a != e:
			parts = append(parts, fmt.Sprintf("%s=%s (expression %s)", c.name, a, e))
		}
	}
	return strings.Join(parts, ", ")
}

// differs says whether a column holds other than its expression gives.
func differs(actual, expected *string) bool { return textOrNull(actual) != textOrNull(expected) }

func textOrNull(s *string) string {
	if s == nil {
		return "NULL"
	}
	return fmt.Sprintf("%q", *s)
}

// describeMismatch renders a mismatch's values (see renderMismatch).
func describeMismatch(t *recompute.Table, m recompute.Mismatch) string {
	cols := make([]columnValues, 0, len(t.Columns))
	for i, col := range t.Columns {
		if i >= len(m.Actual) || i >= len(m.Expected) {
			break
		}
		cols = append(cols, columnValues{name: col.Name, actual: m.Actual[i], expected: m.Expected[i], notNull: col.NotNull})
	}
	return renderMismatch(cols)
}

// String renders the sample as status prints it: its key, then its
// columns by name (see renderMismatch).
func (s MismatchSample) String() string {
	cols := make([]columnValues, 0, len(s.Columns))
	for name, v := range s.Columns {
		cols = append(cols, columnValues{name: name, actual: v.Actual, expected: v.Expected})
	}
	sort.Slice(cols, func(i, j int) bool { return cols[i].name < cols[j].name })
	return s.Key + ": " + renderMismatch(cols)
}
