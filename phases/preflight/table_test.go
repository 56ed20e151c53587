package preflight

import "testing"

func TestCheckTable(t *testing.T) {
	cases := []struct {
		name, setup string
		stop        bool
		status      Status
		want        string
	}{
		{"with a primary key", "CREATE TABLE users (id bigint PRIMARY KEY, full_name text)", false, OK, "primary key (id bigint)"},
		{"without one", "CREATE TABLE users (id bigint, full_name text)", true, Fail, "has no primary key"},
		{"missing", "", true, Fail, "does not exist"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// The harness runs checkTable itself only where it passes.
			in := inspect(t, "", nil)
			if c.setup != "" {
				if _, err := in.conn.Exec(t.Context(), c.setup); err != nil {
					t.Fatal(err)
				}
			}
			if stop := run(t, in, checkTable); stop != c.stop {
				t.Errorf("stop = %v, want %v", stop, c.stop)
			}
			has(t, in.r, c.status, c.want)
		})
	}
}
