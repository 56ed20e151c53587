package phases

import "testing"

// TestRenderMismatch: the log and status render a row out of parity alike:
// only the columns that differ (or are NULL where NOT NULL is coming), by
// name in status.
func TestRenderMismatch(t *testing.T) {
	s := func(v string) *string { return &v }
	cases := []struct {
		name string
		cols []columnValues
		want string
	}{
		{"one differs", []columnValues{{name: "first_name", actual: s("Mary Ann"), expected: s("Mary")}, {name: "last_name", actual: s("Smith"), expected: s("Smith")}},
			`first_name="Mary Ann" (expression "Mary")`},
		{"NULL against a value", []columnValues{{name: "a", expected: s("x")}, {name: "b", actual: s("NULL")}},
			`a=NULL (expression "x"), b="NULL" (expression NULL)`},
		{"NULL where NOT NULL comes", []columnValues{{name: "a", notNull: true}},
			`a=NULL (must not be NULL: the migration makes a NOT NULL; expression NULL)`},
	}
	for _, c := range cases {
		if got := renderMismatch(c.cols); got != c.want {
			t.Errorf("%s: got %s, want %s", c.name, got, c.want)
		}
	}
	sample := MismatchSample{Key: "(id)=(7)", Columns: map[string]Values{
		"last_name":  {Actual: s("b"), Expected: s("B")},
		"first_name": {Actual: s("a"), Expected: nil},
	}}
	if got, want := sample.String(), `(id)=(7): first_name="a" (expression NULL), last_name="b" (expression "B")`; got != want {
		t.Errorf("MismatchSample.String() = %s, want %s", got, want)
	}
}
