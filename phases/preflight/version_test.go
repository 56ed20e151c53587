package preflight

import "testing"

func TestCheckVersion(t *testing.T) {
	in := inspect(t, "", nil)
	if run(t, in, checkVersion) {
		t.Fatal("the test server is PostgreSQL 15+, yet the version check stopped")
	}
	has(t, in.r, OK, "PostgreSQL 1")
}
