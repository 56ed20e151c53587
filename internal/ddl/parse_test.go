package ddl

import (
	"slices"
	"strings"
	"testing"
)

func TestParseRefuses(t *testing.T) {
	cases := []struct{ name, sql, want string }{
		{"two statements", "ALTER TABLE users ADD COLUMN first_name text; DROP TABLE precious",
			`holds 2 statements: "ALTER TABLE users ADD COLUMN first_name text" and "DROP TABLE precious"; write one statement per list entry`},
		{"empty", "  ", "holds no statement"},
		{"only a comment", "-- nothing", "holds no statement"},
		{"syntax error", "ALTER TABLE users ADD COLUM x int", `"ALTER TABLE users ADD COLUM x int" does not parse: syntax error at or near "int" at character 31`},
		{"PostgreSQL 18 syntax", "ALTER TABLE users ADD COLUMN x int GENERATED ALWAYS AS (id + 1) VIRTUAL",
			"does not parse: syntax error at or near \"VIRTUAL\""},
		{"unknown rule in a comment", "-- cdcbackfill:allow rewrites\nALTER TABLE users ADD COLUMN x int", `allows "rewrites", which is no rule`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse(c.sql)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Parse(%q) = %v, want an error with %q", c.sql, err, c.want)
			}
			if strings.Contains(c.name, "18") && !strings.Contains(err.Error(), "PostgreSQL 17's parser") {
				t.Errorf("the error does not name the parser's version: %v", err)
			}
		})
	}
}

func TestStatements(t *testing.T) {
	users := Relation{Name: "users"}
	cases := []struct {
		sql            string
		kind           string
		added, dropped []string
		locks          []Lock
		inTx           bool
	}{
		{sql: "ALTER TABLE users ADD COLUMN first_name text, ADD last_name text", kind: "ALTER TABLE",
			added: []string{"first_name", "last_name"}, locks: []Lock{{users, AccessExclusive}}, inTx: true},
		{sql: `ALTER TABLE public.users ADD COLUMN IF NOT EXISTS "Nick Name" text, ADD CONSTRAINT c CHECK (true) NOT VALID`, kind: "ALTER TABLE",
			added: []string{"Nick Name"}, locks: []Lock{{Relation{Schema: "public", Name: "users"}, AccessExclusive}}, inTx: true},
		{sql: `ALTER TABLE users DROP COLUMN full_name, DROP CONSTRAINT c, DROP IF EXISTS "Old Name", ALTER COLUMN x DROP DEFAULT`, kind: "ALTER TABLE",
			dropped: []string{"full_name", "Old Name"}, locks: []Lock{{users, AccessExclusive}}, inTx: true},
		{sql: "ALTER TABLE USERS VALIDATE CONSTRAINT c", kind: "ALTER TABLE", locks: []Lock{{users, ShareUpdateExclusive}}, inTx: true},
		{sql: "ALTER TABLE users DISABLE TRIGGER t", kind: "ALTER TABLE", locks: []Lock{{users, ShareRowExclusive}}, inTx: true},
		{sql: "ALTER TABLE users ADD CONSTRAINT fk FOREIGN KEY (org) REFERENCES orgs (id) NOT VALID", kind: "ALTER TABLE",
			locks: []Lock{{users, ShareRowExclusive}, {Relation{Name: "orgs"}, ShareRowExclusive}}, inTx: true},
		{sql: "ALTER TABLE users SET (fillfactor = 90), DISABLE TRIGGER t, ALTER COLUMN x SET STATISTICS 100", kind: "ALTER TABLE",
			locks: []Lock{{users, ShareRowExclusive}}, inTx: true},
		{sql: "CREATE INDEX users_fn ON users (full_name)", kind: "CREATE INDEX", locks: []Lock{{users, Share}}, inTx: true},
		{sql: "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS u ON app.users (email)", kind: "CREATE UNIQUE INDEX",
			locks: []Lock{{Relation{Schema: "app", Name: "users"}, ShareUpdateExclusive}}},
		{sql: "DROP INDEX CONCURRENTLY users_fn", kind: "DROP INDEX", locks: []Lock{{Relation{Name: "users_fn", Index: true}, ShareUpdateExclusive}}},
		{sql: "DROP TABLE precious", kind: "DROP TABLE", locks: []Lock{{Relation{Name: "precious"}, AccessExclusive}}, inTx: true},
		{sql: "REINDEX TABLE users", kind: "REINDEX", locks: []Lock{{users, Share}}, inTx: true},
		{sql: "REINDEX (CONCURRENTLY) INDEX users_fn", kind: "REINDEX", locks: []Lock{{Relation{Name: "users_fn", Index: true}, ShareUpdateExclusive}}},
		{sql: "VACUUM (FULL) users", kind: "VACUUM FULL", locks: []Lock{{users, AccessExclusive}}},
		{sql: "VACUUM users", kind: "VACUUM", locks: []Lock{{users, ShareUpdateExclusive}}},
		{sql: "ANALYZE users", kind: "ANALYZE", locks: []Lock{{users, ShareUpdateExclusive}}, inTx: true},
		{sql: "CLUSTER users USING users_pkey", kind: "CLUSTER", locks: []Lock{{users, AccessExclusive}}, inTx: true},
		{sql: "ALTER TABLE users RENAME COLUMN a TO b", kind: "ALTER COLUMN RENAME", locks: []Lock{{users, AccessExclusive}}, inTx: true},
		{sql: "COMMENT ON COLUMN users.first_name IS 'x'", kind: "COMMENT", locks: []Lock{{users, ShareUpdateExclusive}}, inTx: true},
		{sql: "CREATE TABLE audit (id bigint REFERENCES users (id))", kind: "CREATE TABLE", locks: []Lock{{users, ShareRowExclusive}}, inTx: true},
		{sql: "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", kind: "CREATE FUNCTION", inTx: true},
		{sql: "LOCK TABLE users IN SHARE MODE", kind: "LOCK TABLE", locks: []Lock{{users, Share}}, inTx: true},
	}
	for _, c := range cases {
		s, err := Parse(c.sql)
		if err != nil {
			t.Errorf("%s: %v", c.sql, err)
			continue
		}
		if s.Kind != c.kind || !slices.Equal(s.Added, c.added) || !slices.Equal(s.Dropped, c.dropped) ||
			!slices.Equal(s.Locks, c.locks) || s.InTransaction != c.inTx {
			t.Errorf("%s:\n got kind %q added %q dropped %q locks %v in transaction %v\nwant kind %q added %q dropped %q locks %v in transaction %v",
				c.sql, s.Kind, s.Added, s.Dropped, s.Locks, s.InTransaction, c.kind, c.added, c.dropped, c.locks, c.inTx)
		}
	}
}

func TestAllowComment(t *testing.T) {
	s, err := Parse("-- cdcbackfill:allow rewrite, scan\nALTER TABLE users ALTER COLUMN id TYPE bigint")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(s.Allow, []Rule{Rewrite, Scan}) {
		t.Errorf("Allow = %v", s.Allow)
	}
	// A "--" inside a literal is no comment.
	s, err = Parse("ALTER TABLE users ADD COLUMN x text DEFAULT '-- cdcbackfill:allow rewrite'")
	if err != nil || len(s.Allow) != 0 {
		t.Errorf("a literal counted as a comment: %v %v", s.Allow, err)
	}
}

func TestRules(t *testing.T) {
	isUsers := func(r Relation) bool {
		return r.Is("public", "users") || r.Index && strings.HasPrefix(r.Name, "users_")
	}
	cases := []struct {
		list  List
		sql   string
		rules []Rule // refused, in order
		safe  string // in the first refusal's safe form
		notes int    // findings that refuse nothing
	}{
		{Expand, "ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text", nil, "", 0},
		{Contract, "ALTER TABLE users DROP COLUMN full_name", nil, "", 0},
		{Expand, "ALTER TABLE users ADD COLUMN n int DEFAULT 0, ADD COLUMN s text DEFAULT 'x'::text", nil, "", 0},
		{Expand, "ALTER TABLE users ADD COLUMN token uuid DEFAULT gen_random_uuid()", []Rule{Rewrite},
			"ALTER TABLE users ADD COLUMN token uuid; then ALTER TABLE \"users\" ALTER COLUMN \"token\" SET DEFAULT", 0},
		{Expand, "ALTER TABLE users ADD COLUMN n bigint GENERATED ALWAYS AS (id * 2) STORED", []Rule{Rewrite}, "a plain column", 0},
		{Expand, "ALTER TABLE users ADD COLUMN n bigserial", []Rule{Rewrite}, "", 0},
		{Contract, "ALTER TABLE users ALTER COLUMN id TYPE integer", []Rule{Rewrite}, "add a column of the new type", 0},
		{Expand, "ALTER TABLE users SET TABLESPACE fast", []Rule{Rewrite}, "", 0},
		{Expand, "ALTER TABLE users SET UNLOGGED", []Rule{Rewrite}, "", 0},
		{Expand, "VACUUM FULL users", []Rule{Rewrite}, "VACUUM (without FULL)", 0},
		{Expand, "CLUSTER users USING users_pkey", []Rule{Rewrite}, "", 0},
		{Contract, "ALTER TABLE users ALTER COLUMN first_name SET NOT NULL", []Rule{Scan}, `CHECK ("first_name" IS NOT NULL) NOT VALID`, 0},
		{Expand, "ALTER TABLE users ADD CONSTRAINT c CHECK (id > 0)", []Rule{Scan}, "ALTER TABLE users ADD CONSTRAINT c CHECK (id > 0) NOT VALID", 0},
		{Expand, "ALTER TABLE users ADD CONSTRAINT c CHECK (id > 0) NOT VALID", nil, "", 0},
		{Expand, "ALTER TABLE users VALIDATE CONSTRAINT c", nil, "", 0},
		{Contract, "ALTER TABLE users VALIDATE CONSTRAINT c", []Rule{Scan}, "validate before the cut-over", 0},
		{Expand, "ALTER TABLE users ADD CONSTRAINT fk FOREIGN KEY (org) REFERENCES orgs (id)", []Rule{Scan}, "NOT VALID", 1},
		{Expand, "ALTER TABLE users ADD PRIMARY KEY (id)", []Rule{Scan}, "USING INDEX", 0},
		{Expand, "ALTER TABLE users ADD CONSTRAINT u UNIQUE USING INDEX u", nil, "", 0},
		{Expand, "CREATE INDEX users_fn ON users (full_name)", []Rule{BlockingIndex}, "CREATE INDEX CONCURRENTLY users_fn ON users", 0},
		{Expand, "CREATE INDEX CONCURRENTLY users_fn ON users (full_name)", nil, "", 0},
		{Contract, "CREATE INDEX CONCURRENTLY users_fn ON users (full_name)", []Rule{""}, "put the statement that drops the old column first", 0},
		{Rollback, "DROP INDEX users_fn", []Rule{BlockingIndex}, "DROP INDEX CONCURRENTLY users_fn", 0},
		{Contract, "DROP INDEX users_fn", nil, "", 0},
		{Expand, "REINDEX INDEX users_fn", []Rule{BlockingIndex}, "REINDEX (CONCURRENTLY) INDEX users_fn", 0},
		{Expand, "CREATE INDEX orders_x ON orders (x)", nil, "", 1},
		{Expand, "DROP TABLE precious", nil, "", 1},
		{Contract, "DROP TABLE precious", []Rule{OtherRelation}, "outside the migration", 0},
		{Contract, "-- cdcbackfill:allow scan\nALTER TABLE users ALTER COLUMN first_name SET NOT NULL", nil, "", 1},
	}
	for _, c := range cases {
		s, err := Parse(c.sql)
		if err != nil {
			t.Errorf("%s: %v", c.sql, err)
			continue
		}
		found := Judge(s, Context{List: c.list, Index: 0, IsTable: isUsers})
		var refused []Rule
		notes := 0
		var first *Finding
		for i, f := range found {
			if f.Refused {
				refused = append(refused, f.Rule)
				if first == nil {
					first = &found[i]
				}
			} else {
				notes++
			}
			if !strings.Contains(f.Problem, s.Quote()) {
				t.Errorf("%s: the finding does not name the statement: %s", c.sql, f.Problem)
			}
		}
		if !slices.Equal(refused, c.rules) || notes != c.notes {
			t.Errorf("%s in %s: refused %q and %d notes, want %q and %d: %+v", c.sql, c.list, refused, notes, c.rules, c.notes, found)
			continue
		}
		if first != nil && !strings.Contains(first.SafeForm, c.safe) {
			t.Errorf("%s: safe form %q, want it to hold %q", c.sql, first.SafeForm, c.safe)
		}
	}
}

func TestRulesAllowedByConfig(t *testing.T) {
	s, _ := Parse("CREATE INDEX users_fn ON users (full_name)")
	found := Judge(s, Context{List: Expand, IsTable: func(r Relation) bool { return r.Name == "users" }, Allow: []Rule{BlockingIndex}})
	if len(found) != 1 || found[0].Refused || found[0].AllowedBy != "ddl.allow" {
		t.Errorf("found %+v", found)
	}
}

func TestTriedDecides(t *testing.T) {
	s, _ := Parse("ALTER TABLE users ALTER COLUMN name TYPE text")
	isUsers := func(r Relation) bool { return r.Name == "users" }
	if f := Judge(s, Context{List: Contract, IsTable: isUsers, Tried: &Tried{Lock: AccessExclusive}}); len(f) != 0 {
		t.Errorf("a type change the server did not rewrite is refused: %+v", f)
	}
	f := Judge(s, Context{List: Contract, IsTable: isUsers, Untried: "no TEMP privilege"})
	if len(f) != 1 || !strings.Contains(f[0].Problem, "no TEMP privilege; judged from the parse tree") {
		t.Errorf("untried: %+v", f)
	}
	// What the server's copy did and the tree did not foresee counts.
	s, _ = Parse("ALTER TABLE users ADD COLUMN d positive_int DEFAULT 1")
	f = Judge(s, Context{List: Expand, IsTable: isUsers, Tried: &Tried{Rewrote: true, Lock: AccessExclusive}})
	if len(f) != 1 || f[0].Rule != Rewrite {
		t.Errorf("a rewrite the server saw: %+v", f)
	}
}
