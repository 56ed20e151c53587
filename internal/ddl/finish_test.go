package ddl

import (
	"reflect"
	"strings"
	"testing"
)

func parseAll(t *testing.T, sqls ...string) []*Statement {
	t.Helper()
	out := make([]*Statement, len(sqls))
	for i, s := range sqls {
		st, err := Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = st
	}
	return out
}

// bare drops the quotes the daemon puts around every identifier, to
// compare with statements as a person writes them.
func bare(sqls []string) []string {
	out := make([]string, len(sqls))
	for i, s := range sqls {
		out[i] = strings.ReplaceAll(s, `"`, "")
	}
	return out
}

// TestPlanFinish: what the user writes, and what the daemon makes of it.
func TestPlanFinish(t *testing.T) {
	users := Relation{Schema: "public", Name: "users"}
	newCols := []string{"first_name", "last_name"}
	f, err := PlanFinish(
		parseAll(t, `ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text`,
			`CREATE INDEX IF NOT EXISTS users_last ON users (last_name)`,
			`CREATE INDEX users_email ON users (email)`),
		parseAll(t, `ALTER TABLE users DROP COLUMN full_name, ALTER COLUMN first_name SET NOT NULL`,
			`ALTER TABLE users ADD CONSTRAINT users_names UNIQUE (first_name, last_name)`,
			`ALTER TABLE public.users ADD CONSTRAINT first_short CHECK (length(first_name) < 100)`,
			`ALTER TABLE users ADD CONSTRAINT last_ref FOREIGN KEY (last_name) REFERENCES names (name)`,
			`ALTER TABLE users ALTER COLUMN email SET NOT NULL`),
		users, newCols, 170000)
	if err != nil {
		t.Fatal(err)
	}
	wantExpand := []string{`ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text`, `CREATE INDEX users_email ON users (email)`}
	if !reflect.DeepEqual(f.Expand, wantExpand) {
		t.Errorf("expand %q, want %q", f.Expand, wantExpand)
	}
	wantContract := []string{
		`ALTER TABLE users DROP full_name`,
		`ALTER TABLE users ALTER COLUMN email SET NOT NULL`, // not a new column: the guard judges it
		// Attach:
		`ALTER TABLE public.users ALTER COLUMN first_name SET NOT NULL`,
		`ALTER TABLE public.users DROP CONSTRAINT cdcbackfill_not_null_first_name`,
		`ALTER TABLE public.users ADD CONSTRAINT users_names UNIQUE USING INDEX users_names`,
	}
	if !reflect.DeepEqual(bare(append(f.Contract, f.Attach...)), wantContract) {
		t.Errorf("contract\n%q\nwant\n%q", f.Contract, wantContract)
	}
	var idx []string
	for _, ix := range f.Indexes {
		idx = append(idx, ix.SQL)
	}
	wantIdx := []string{`CREATE INDEX CONCURRENTLY users_last ON users USING btree (last_name)`,
		`CREATE UNIQUE INDEX CONCURRENTLY users_names ON public.users (first_name, last_name)`}
	if !reflect.DeepEqual(bare(idx), wantIdx) {
		t.Errorf("indexes\n%q\nwant\n%q", idx, wantIdx)
	}
	var adds []string
	for _, p := range f.Prepare {
		adds = append(adds, p.Add, p.Validate)
	}
	wantAdds := []string{
		`ALTER TABLE public.users ADD CONSTRAINT cdcbackfill_not_null_first_name CHECK (first_name IS NOT NULL) NOT VALID`,
		`ALTER TABLE public.users VALIDATE CONSTRAINT cdcbackfill_not_null_first_name`,
		`ALTER TABLE public.users ADD CONSTRAINT first_short CHECK (length(first_name) < 100) NOT VALID`,
		`ALTER TABLE public.users VALIDATE CONSTRAINT first_short`,
		`ALTER TABLE users ADD CONSTRAINT last_ref FOREIGN KEY (last_name) REFERENCES names (name) NOT VALID`,
		`ALTER TABLE public.users VALIDATE CONSTRAINT last_ref`,
	}
	if !reflect.DeepEqual(bare(adds), wantAdds) {
		t.Errorf("prepare\n%q\nwant\n%q", adds, wantAdds)
	}
	if !reflect.DeepEqual(f.NotNull, []string{"first_name"}) {
		t.Errorf("not null %q", f.NotNull)
	}
	var undos []string
	for _, u := range f.Undo {
		undos = append(undos, u.SQL)
	}
	undo := strings.Join(bare(undos), "\n")
	for _, w := range []string{"DROP CONSTRAINT IF EXISTS cdcbackfill_not_null_first_name", "DROP CONSTRAINT IF EXISTS first_short",
		"DROP CONSTRAINT IF EXISTS last_ref", "DROP INDEX CONCURRENTLY IF EXISTS public.users_last", "DROP INDEX CONCURRENTLY IF EXISTS public.users_names"} {
		if !strings.Contains(undo, w) {
			t.Errorf("undo lacks %q:\n%s", w, undo)
		}
	}
}

func TestPlanFinishNeedsNames(t *testing.T) {
	users := Relation{Schema: "public", Name: "users"}
	for _, sql := range []string{`CREATE INDEX ON users (last_name)`, `ALTER TABLE users ADD UNIQUE (last_name)`} {
		_, err := PlanFinish(nil, parseAll(t, sql), users, []string{"last_name"}, 0)
		if err == nil || !strings.Contains(err.Error(), "name the") {
			t.Errorf("%s: %v, want an error asking for a name", sql, err)
		}
	}
}

// TestPlanFinishNotNull18: on 18 the NOT NULL itself goes NOT VALID and is
// validated; the cut-over has nothing to attach for it.
func TestPlanFinishNotNull18(t *testing.T) {
	f, err := PlanFinish(nil, parseAll(t, `ALTER TABLE users ALTER COLUMN first_name SET NOT NULL`),
		Relation{Schema: "public", Name: "users"}, []string{"first_name"}, 180001)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Attach) != 0 || len(f.Contract) != 0 {
		t.Errorf("cut-over %q %q, want nothing", f.Contract, f.Attach)
	}
	if len(f.Prepare) != 1 || bare([]string{f.Prepare[0].Add})[0] != `ALTER TABLE public.users ADD CONSTRAINT users_first_name_not_null NOT NULL first_name NOT VALID` {
		t.Errorf("prepare %+v", f.Prepare)
	}
}
