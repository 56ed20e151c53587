package ddl

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func TestTryOnCopy(t *testing.T) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text, nick varchar(10), score bigint,
			seq bigint GENERATED ALWAYS AS IDENTITY, twice bigint GENERATED ALWAYS AS (id * 2) STORED);
		INSERT INTO users (id, full_name, email) SELECT g, 'a b', NULL FROM generate_series(1, 10) g;
		ALTER TABLE users ADD CONSTRAINT email_nn CHECK (email IS NOT NULL) NOT VALID, ADD CONSTRAINT full_nn CHECK (full_name IS NOT NULL)`)
	if err != nil {
		t.Fatal(err)
	}
	setup := mustParse(t, "ALTER TABLE users ADD COLUMN first_name text")
	cases := []struct {
		sql              string
		rewrote, scanned bool
		lock             LockMode
	}{
		{"ALTER TABLE users ADD COLUMN token uuid DEFAULT gen_random_uuid()", true, true, AccessExclusive},
		{"ALTER TABLE users ADD COLUMN at timestamptz DEFAULT now()", false, false, AccessExclusive},
		{"ALTER TABLE users ALTER COLUMN score TYPE integer", true, true, AccessExclusive},
		{"ALTER TABLE users ALTER COLUMN nick TYPE text", false, false, AccessExclusive},
		{"ALTER TABLE users ALTER COLUMN email SET NOT NULL", false, true, AccessExclusive},      // its check is NOT VALID
		{"ALTER TABLE users ALTER COLUMN full_name SET NOT NULL", false, false, AccessExclusive}, // its check is validated
		{"ALTER TABLE users ALTER COLUMN first_name SET STATISTICS 200", false, false, ShareUpdateExclusive},
	}
	stmts := make([]*Statement, len(cases))
	for i, c := range cases {
		stmts[i] = mustParse(t, c.sql)
	}
	tried, err := TryOnCopy(ctx, conn, "public", "users", []*Statement{setup}, stmts)
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range cases {
		got := tried[i]
		if got == nil || got.Err != nil || got.Rewrote != c.rewrote || got.Scanned != c.scanned || got.Lock != c.lock {
			t.Errorf("%s: tried %+v, want rewrote %v scanned %v lock %s", c.sql, got, c.rewrote, c.scanned, c.lock)
		}
	}
	// Statements naming another relation are not tried; the table is untouched.
	tried, err = TryOnCopy(ctx, conn, "public", "users", nil, []*Statement{mustParse(t, "DROP TABLE users"), mustParse(t, "ALTER TABLE users ADD COLUMN x int REFERENCES orgs")})
	if err != nil || tried[0] != nil || tried[1] != nil {
		t.Errorf("tried %v, %v", tried, err)
	}
	var cols int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'users'").Scan(&cols); err != nil || cols != 7 {
		t.Errorf("the table has %d columns (%v), want its 7", cols, err)
	}
}

func mustParse(t *testing.T, sql string) *Statement {
	t.Helper()
	s, err := Parse(sql)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
