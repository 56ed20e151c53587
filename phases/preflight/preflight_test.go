package preflight

import (
	"context"
	"strings"
	"testing"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

// Each check is tested on its own against a real server: a fresh database
// with the table of the running example (users, full_name split into
// first_name), set up as the case needs, the check run alone, and the
// lines it added read back. That the checks run in order, and what plan
// prints of them, the plan tests of cmd/cdcbackfill show.

func TestMain(m *testing.M) { pgtest.Main(m) }

const usersTable = "CREATE TABLE users (id bigint PRIMARY KEY, full_name text); INSERT INTO users SELECT g, 'Ann Lee' FROM generate_series(1, 10) g; ANALYZE users"

// inspect makes a database, runs setup in it and returns the inspection a
// check starts from, for a config of users (edited by edit). With the table
// there, checkState and checkTable have run and their lines are cleared.
func inspect(t *testing.T, setup string, edit func(*config.Config)) *inspection {
	t.Helper()
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	conn, err := dbconn.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	if setup != "" {
		if _, err := conn.Exec(ctx, setup); err != nil {
			t.Fatalf("setup: %v", err)
		}
	}
	cfg := config.Default()
	cfg.Name, cfg.Database.DSN, cfg.Table = "m", dsn, "users"
	cfg.Columns = []config.Column{{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"}}
	cfg.Expand = []string{"ALTER TABLE users ADD COLUMN first_name text"}
	cfg.Contract = []string{"ALTER TABLE users DROP COLUMN full_name"}
	if edit != nil {
		edit(cfg)
	}
	in := &inspection{r: &Report{}, cfg: cfg, conn: conn}
	if strings.Contains(setup, "CREATE TABLE users") {
		for _, c := range []check{checkState, checkTable} {
			if stop, err := c(ctx, in); err != nil || stop {
				t.Fatalf("before the check: stop %v, err %v, lines %v", stop, err, in.r.Checks)
			}
		}
		in.r.Checks = nil
	}
	return in
}

// run runs c and fails the test on an error.
func run(t *testing.T, in *inspection, c check) (stop bool) {
	t.Helper()
	stop, err := c(context.Background(), in)
	if err != nil {
		t.Fatal(err)
	}
	return stop
}

// has fails the test unless the report holds a line of status whose name,
// problem or fix contains text.
func has(t *testing.T, r *Report, status Status, text string) {
	t.Helper()
	for _, c := range r.Checks {
		if c.Status == status && strings.Contains(c.Name+" "+c.Problem+" "+c.Fix, text) {
			return
		}
	}
	t.Errorf("no %s line with %q in %+v", status, text, r.Checks)
}

// noFail fails the test when the report holds a FAIL.
func noFail(t *testing.T, r *Report) {
	t.Helper()
	if err := r.Err(); err != nil {
		t.Errorf("unexpected FAIL: %v", err)
	}
}
