package main

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

func TestHelpDescribesInterface(t *testing.T) {
	r := cli(t, 10*time.Second, nil, "--help")
	mustContain(t, r, "run", "plan", "status", "pause", "resume", "approve", "abort", "demo", "CDCBACKFILL_DATABASE_DSN")
	r = cli(t, 10*time.Second, nil, "status", "--help")
	mustContain(t, r, "--json", "--watch", "--config")
	r = cli(t, 10*time.Second, nil, "abort", "--help")
	mustContain(t, r, "--rollback")
}

func TestPlanAllGood(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	exec1(t, dsn, seedUsers)
	r := cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, usersConfig(dsn)))
	if r.code != 0 {
		t.Fatalf("plan failed\n%s", r)
	}
	mustContain(t, r, "ok    wal_level is logical", "primary key (id bigint)", "column first_name is added by expand",
		"expression for last_name is valid SQL over the row", "role may replicate", "ALTER TABLE users ADD COLUMN first_name text",
		"first_name = split_part(full_name, ' ', 1)", "about 1000 rows", "plan: all checks passed; nothing was changed",
		"ok    standbys: none")
	assertUnchanged(t, dsn)
}

// plan names the standbys and physical slots the throttle watches, the
// ones it ignores, and warns of a slot nobody reads, which would hold the
// backfill.
func TestPlanListsStandbys(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	exec1(t, dsn, seedUsers,
		"SELECT pg_create_physical_replication_slot('old_standby', true)",
		"SELECT pg_create_physical_replication_slot('gone_standby', true)")
	t.Cleanup(func() {
		exec1(t, dsn, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ('old_standby', 'gone_standby')")
	})
	pgtest.StartStandby(t, "replica1")
	cfg := usersConfig(dsn) + "throttle:\n  ignore_slots: [old_standby]\n"
	r := cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, cfg))
	if r.code != 0 {
		t.Fatalf("plan failed\n%s", r)
	}
	mustContain(t, r, "on slot replica1, connected", "watched (throttle.max_replica_lag 10s, throttle.max_replica_lag_bytes 1024 MB)",
		"ok    physical slot old_standby, no standby connected, holds", "ignored (throttle.ignore_slots)",
		`warn  standby gone_standby: the backfill would wait now: standby slot "gone_standby" is not connected and holds`)
}

// assertUnchanged checks that plan left no trace: no state schema, no slot,
// no publication, no new column.
func assertUnchanged(t *testing.T, dsn string) {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var schemas, slots, pubs, cols int
	err = conn.QueryRow(context.Background(), `SELECT
		(SELECT count(*) FROM pg_namespace WHERE nspname = 'cdcbackfill'),
		(SELECT count(*) FROM pg_replication_slots WHERE database = current_database()),
		(SELECT count(*) FROM pg_publication),
		(SELECT count(*) FROM information_schema.columns WHERE table_name = 'users' AND column_name IN ('first_name', 'last_name'))`).
		Scan(&schemas, &slots, &pubs, &cols)
	if err != nil {
		t.Fatal(err)
	}
	if schemas+slots+pubs+cols != 0 {
		t.Errorf("plan changed the database: schema %d, slots %d, publications %d, new columns %d", schemas, slots, pubs, cols)
	}
}

// TestPlanExpressionVolatility: a volatile expression or a subquery is
// refused (it never reaches parity), a stable one warned with the settings
// it depends on and their values, an immutable one passes.
func TestPlanExpressionVolatility(t *testing.T) {
	cases := []struct {
		name  string
		setup string
		expr  string
		code  int
		want  []string
	}{
		{"volatile function", "", `split_part(full_name, ' ', 1) || random()::text`, 1,
			[]string{"FAIL  expression for last_name: columns.last_name calls volatile function random: its value changes at every evaluation", "never reaches parity"}},
		{"sequence", "CREATE SEQUENCE s", `nextval('s')::text`, 1,
			[]string{"FAIL  expression for last_name: columns.last_name calls volatile function nextval"}},
		{"subquery", "CREATE TABLE other (id int PRIMARY KEY, v text)", `(SELECT v FROM other WHERE id = 1) || full_name`, 1,
			[]string{"FAIL  expression for last_name: columns.last_name: a subquery reads another table, whose changes are not in the stream"}},
		{"aggregate", "", `count(*)::text`, 1,
			[]string{"FAIL  expression for last_name: columns.last_name: ", "aggregate functions are not allowed"}},
		{"timestamptz output", "ALTER TABLE users ADD COLUMN created_at timestamptz", `created_at::text`, 0,
			[]string{"warn  stable expression last_name: created_at::text: timestamptz output depends on TimeZone, DateStyle",
				"(the daemon evaluates with TimeZone=", "(created_at AT TIME ZONE 'UTC')::date", "plan: all checks passed"}},
		{"transaction time", "", `now()::text`, 0,
			[]string{"warn  stable expression last_name: now(): stable function now", "the daemon's is never the application's"}},
		{"text || integer", "", `'b' || id`, 0, []string{"ok    expression for last_name is valid SQL over the row, immutable"}},
		{"upper", "", `upper(email)`, 0, []string{"ok    expression for last_name is valid SQL over the row, immutable"}},
		{"text || text", "", `email || 'a'`, 0, []string{"ok    expression for last_name is valid SQL over the row, immutable"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dsn := pgtest.NewDatabase(t)
			exec1(t, dsn, seedUsers)
			if c.setup != "" {
				exec1(t, dsn, c.setup)
			}
			yaml := strings.Replace(usersConfig(dsn), "split_part(full_name, ' ', 2)", `"`+strings.ReplaceAll(c.expr, `"`, `\"`)+`"`, 1)
			r := cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, yaml))
			if r.code != c.code {
				t.Fatalf("exit %d, want %d\n%s", r.code, c.code, r)
			}
			mustContain(t, r, c.want...)
			if c.code == 0 {
				mustContain(t, r, "evaluated with the database's and role's settings (as the daemon connects): TimeZone=")
			}
		})
	}
}

func TestPlanProblems(t *testing.T) {
	cases := []struct {
		name  string
		setup string
		after string
		edit  func(string) string
		want  []string
	}{
		{
			name:  "table without a primary key",
			setup: "CREATE TABLE users (id bigint, full_name text)",
			want:  []string{"FAIL  primary key: table public.users has no primary key", `ALTER TABLE "public"."users" ADD PRIMARY KEY`},
		},
		{
			name:  "missing table",
			setup: "CREATE TABLE people (id bigint PRIMARY KEY, full_name text)",
			want:  []string{"FAIL  table: table public.users does not exist"},
		},
		{
			name:  "expression with a typo",
			setup: seedUsers,
			edit: func(s string) string {
				return strings.Replace(s, "split_part(full_name, ' ', 2)", "split_prt(full_name, ' ', 2)", 1)
			},
			want: []string{"FAIL  expression for last_name: columns.last_name:", "function split_prt(text, unknown, integer) does not exist"},
		},
		{
			name:  "expression over a missing column",
			setup: seedUsers,
			edit: func(s string) string {
				return strings.Replace(s, "split_part(full_name, ' ', 2)", "split_part(fullname, ' ', 2)", 1)
			},
			want: []string{"FAIL  expression for last_name", `column "fullname" does not exist`},
		},
		{
			name:  "expression with a second statement",
			setup: seedUsers,
			edit: func(s string) string {
				return strings.Replace(s, "split_part(full_name, ' ', 2)", `"'x'); DROP TABLE users; --"`, 1)
			},
			want: []string{"FAIL  expression for last_name", "closes the parenthesis the expression is put in"},
		},
		{
			name:  "target column neither exists nor is added",
			setup: seedUsers,
			edit: func(s string) string {
				return strings.Replace(s, ", ADD COLUMN last_name text", "", 1)
			},
			want: []string{`FAIL  column last_name: column "last_name" neither exists in "public"."users" nor is added by an expand statement`},
		},
		{
			name:  "replica identity nothing",
			setup: seedUsers,
			after: "ALTER TABLE users REPLICA IDENTITY NOTHING",
			want: []string{"FAIL  replica identity: table \"public\".\"users\" has no replica identity (REPLICA IDENTITY NOTHING",
				"refuse the application's UPDATEs and DELETEs", `ALTER TABLE "public"."users" REPLICA IDENTITY DEFAULT`},
		},
		{
			name: "a partition without replica identity",
			setup: `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text) PARTITION BY RANGE (id);
				CREATE TABLE users_1 PARTITION OF users FOR VALUES FROM (0) TO (1000);
				CREATE TABLE users_2 PARTITION OF users FOR VALUES FROM (1000) TO (MAXVALUE);
				INSERT INTO users SELECT g, 'a' || g || ' b', 'e' FROM generate_series(1, 2000) g`,
			after: "ALTER TABLE users_2 REPLICA IDENTITY NOTHING",
			want: []string{"FAIL  replica identity: public.users_2, part of \"public\".\"users\", has no replica identity",
				"ALTER TABLE public.users_2 REPLICA IDENTITY DEFAULT"},
		},
		{
			name:  "replica identity of another index",
			setup: seedUsers,
			after: "ALTER TABLE users ALTER COLUMN email SET NOT NULL; CREATE UNIQUE INDEX users_email ON users (email); ALTER TABLE users REPLICA IDENTITY USING INDEX users_email",
			want: []string{"FAIL  replica identity: table \"public\".\"users\" has REPLICA IDENTITY USING INDEX of an index other than its primary key",
				`ALTER TABLE "public"."users" REPLICA IDENTITY DEFAULT`},
		},
		{
			name:  "slot name taken",
			setup: seedUsers,
			after: "SELECT pg_create_logical_replication_slot('cdcbackfill_split_full_name', 'pgoutput')",
			want:  []string{`FAIL  replication slot: a replication slot named "cdcbackfill_split_full_name" already exists and is not this migration's`, "pg_drop_replication_slot"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dsn := pgtest.NewDatabase(t)
			exec1(t, dsn, c.setup)
			if c.after != "" {
				exec1(t, dsn, c.after)
			}
			yaml := usersConfig(dsn)
			if c.edit != nil {
				yaml = c.edit(yaml)
			}
			r := cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, yaml))
			if r.code != 1 {
				t.Fatalf("want exit 1\n%s", r)
			}
			mustContain(t, r, append(c.want, "plan: problems found; nothing was changed")...)
		})
	}
}

func TestPlanRoleWithoutReplication(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	exec1(t, dsn, seedUsers, "CREATE ROLE app LOGIN PASSWORD 's3cret-pw'", "ALTER TABLE users OWNER TO app")
	conn, _ := pgx.Connect(context.Background(), dsn)
	var db string
	_ = conn.QueryRow(context.Background(), "SELECT current_database()").Scan(&db)
	conn.Close(context.Background())
	exec1(t, dsn, "GRANT CREATE ON DATABASE "+pgx.Identifier{db}.Sanitize()+" TO app")
	appDSN := pgtest.Shared(t).DSNFor(db, "app", "s3cret-pw")
	r := cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, usersConfig(appDSN)))
	if r.code != 1 {
		t.Fatalf("want exit 1\n%s", r)
	}
	mustContain(t, r, "FAIL  role: the role has neither REPLICATION nor SUPERUSER", "ALTER ROLE <role> REPLICATION")
	if strings.Contains(r.stdout+r.stderr, "s3cret-pw") {
		t.Errorf("the password appears in the output\n%s", r)
	}
	exec1(t, dsn, "DROP OWNED BY app", "DROP ROLE app")
}

func TestPlanDatabaseThatDoesNotAnswer(t *testing.T) {
	// A port nobody listens on: refused at once, never a hang.
	yaml := usersConfig("postgres://app:pw-never-shown@127.0.0.1:1/app?sslmode=disable&connect_timeout=3")
	r := cli(t, 20*time.Second, nil, "plan", "--config", writeConfig(t, yaml))
	if r.code != 1 {
		t.Fatalf("want exit 1\n%s", r)
	}
	mustContain(t, r, "FAIL  connect:", "127.0.0.1", "check database.dsn")
	if strings.Contains(r.stdout+r.stderr, "pw-never-shown") {
		t.Errorf("the password appears in the output\n%s", r)
	}
}

func TestBadConfig(t *testing.T) {
	cases := []struct{ name, yaml, want string }{
		{"malformed yaml", "name: [unclosed\n", "migration.yaml"},
		{"unknown key", "name: x\nbackfil:\n  batch_size: 1\n", `unknown key "backfil"`},
		{"bad name", "name: Bad-Name\n", "name:"},
		{"bad duration", "name: x\nbackfill:\n  target_batch_time: fast\n", "backfill.target_batch_time"},
		{"bad size", "name: x\nthrottle:\n  max_slot_lag: lots\n", "throttle.max_slot_lag"},
		{"no columns", "name: x\ndatabase:\n  dsn: postgres://h/db\ntable: t\n", "columns"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := cli(t, 10*time.Second, nil, "plan", "--config", writeConfig(t, c.yaml))
			if r.code != 1 {
				t.Fatalf("want exit 1\n%s", r)
			}
			mustContain(t, r, c.want)
		})
	}
}

// TestPlanServerSettings: wal_level not logical, and no replication slot
// free. Both need a server restart, so they share one test and restore the
// server's settings at the end.
func TestPlanServerSettings(t *testing.T) {
	srv := pgtest.Shared(t)
	if srv.Kind() == "env" {
		t.Skip("needs to restart the server; CDCBACKFILL_TEST_DSN points at one this test must not restart")
	}
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	exec1(t, dsn, seedUsers)
	restartWith := func(settings ...string) {
		t.Helper()
		exec1(t, srv.DSN(), settings...)
		if err := srv.Restart(ctx); err != nil {
			t.Fatal(err)
		}
	}
	defer restartWith("ALTER SYSTEM RESET wal_level")
	cfg := writeConfig(t, usersConfig(dsn))

	restartWith("ALTER SYSTEM SET wal_level = replica")
	r := cli(t, 30*time.Second, nil, "plan", "--config", cfg)
	if r.code != 1 {
		t.Fatalf("want exit 1\n%s", r)
	}
	mustContain(t, r, `FAIL  wal_level: wal_level is "replica", logical replication needs "logical"`, "ALTER SYSTEM SET wal_level = logical")

	restartWith("ALTER SYSTEM RESET wal_level")
	// Take every free slot (restarting with fewer slots would not do: the
	// server keeps replication origin state in the same slots).
	exec1(t, dsn, `SELECT pg_create_logical_replication_slot('someone_else_' || g, 'pgoutput')
		FROM generate_series(1, current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)) g`)
	r = cli(t, 30*time.Second, nil, "plan", "--config", cfg)
	if r.code != 1 {
		t.Fatalf("want exit 1\n%s", r)
	}
	mustContain(t, r, "FAIL  replication slot: no replication slot is free", "raise max_replication_slots")
}

// TestPlanRefusesUnsafeDDL: plan reads every statement with PostgreSQL's
// parser and refuses what would block the application for a time that
// grows with the table, naming the statement and its safe form; allowed
// explicitly, the same statement passes and plan says it was allowed.
func TestPlanRefusesUnsafeDDL(t *testing.T) {
	cases := []struct {
		name, list, stmt string
		rule             string // "": cannot be allowed
		want             []string
	}{
		{"volatile default", "expand", "ALTER TABLE users ADD COLUMN token uuid DEFAULT gen_random_uuid()", "rewrite",
			[]string{"FAIL  expand[1]: \"ALTER TABLE users ADD COLUMN token uuid DEFAULT gen_random_uuid()\" rewrites the table",
				"the server's copy of the table shows it does", "fix: ALTER TABLE users ADD COLUMN token uuid; then ALTER TABLE \"users\" ALTER COLUMN \"token\" SET DEFAULT"}},
		{"index without CONCURRENTLY", "expand", "CREATE INDEX users_fn ON users (full_name)", "blocking_index",
			[]string{"FAIL  expand[1]: \"CREATE INDEX users_fn ON users (full_name)\" blocks the table for an index", "SHARE lock",
				"fix: CREATE INDEX CONCURRENTLY users_fn ON users USING btree (full_name)"}},
		{"type change that rewrites", "contract", "ALTER TABLE users ALTER COLUMN id TYPE integer", "rewrite",
			[]string{"FAIL  contract[1]: \"ALTER TABLE users ALTER COLUMN id TYPE integer\" rewrites the table", "the server's copy of the table shows it does",
				"fix: expand/contract the column itself"}},
		// On a new column the daemon takes SET NOT NULL over (see
		// TestPlanShowsWhatNewColumnsBecome); on an old one it is refused.
		{"NOT NULL in the cut-over", "contract", "ALTER TABLE users ALTER COLUMN email SET NOT NULL", "scan",
			[]string{"FAIL  contract[1]: \"ALTER TABLE users ALTER COLUMN email SET NOT NULL\" scans the table under a blocking lock",
				"the server's copy of the table shows it does", `fix: ALTER TABLE "users" ADD CONSTRAINT "email_not_null" CHECK ("email" IS NOT NULL) NOT VALID`}},
		{"two statements in one entry", "expand", "ALTER TABLE users ADD COLUMN first_name text; DROP TABLE precious", "",
			[]string{`FAIL  expand[1]: holds 2 statements: "ALTER TABLE users ADD COLUMN first_name text" and "DROP TABLE precious"; write one statement per list entry`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dsn := pgtest.NewDatabase(t)
			exec1(t, dsn, seedUsers, "CREATE TABLE precious (id int)")
			yaml := withStatement(usersConfig(dsn), c.list, c.stmt)
			r := cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, yaml))
			if r.code != 1 {
				t.Fatalf("want exit 1\n%s", r)
			}
			mustContain(t, r, append(c.want, "plan: problems found; nothing was changed")...)
			if c.rule == "" {
				return
			}
			mustContain(t, r, "ddl.allow: ["+c.rule+"]")
			r = cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, yaml+"ddl:\n  allow: ["+c.rule+"]\n"))
			if r.code != 0 {
				t.Fatalf("allowed by ddl.allow, want exit 0\n%s", r)
			}
			mustContain(t, r, "(allowed by ddl.allow)", "plan: all checks passed")
			r = cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, withStatement(usersConfig(dsn), c.list, "/* cdcbackfill:allow "+c.rule+" */ "+c.stmt)))
			if r.code != 0 {
				t.Fatalf("allowed by its comment, want exit 0\n%s", r)
			}
			mustContain(t, r, "(allowed by its comment cdcbackfill:allow "+c.rule+")")
			assertUnchanged(t, dsn)
		})
	}
}

// TestPlanDescribesDDL: the running example passes, and plan says what
// each statement locks and that it neither rewrites nor scans.
func TestPlanDescribesDDL(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	exec1(t, dsn, seedUsers)
	yaml := usersConfig(dsn) + "rollback:\n  - ALTER TABLE users DROP COLUMN first_name, DROP COLUMN last_name\n"
	r := cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, yaml))
	if r.code != 0 {
		t.Fatalf("plan failed\n%s", r)
	}
	mustContain(t, r,
		`ok    expand[0] ALTER TABLE: ACCESS EXCLUSIVE on "users" (blocks reads and writes, no rewrite, no scan); tried on a copy of the table`,
		`ok    contract[0] ALTER TABLE: ACCESS EXCLUSIVE on "users" (blocks reads and writes, no rewrite, no scan); tried on a copy of the table`,
		`ok    rollback[0] ALTER TABLE: ACCESS EXCLUSIVE on "users" (blocks reads and writes, no rewrite, no scan); tried on a copy of the table`)
	assertUnchanged(t, dsn)
}

// withStatement appends stmt to the expand or contract list of a config.
func withStatement(yaml, list, stmt string) string {
	anchor := map[string]string{
		"expand":   "  - ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text\n",
		"contract": "  - ALTER TABLE users DROP COLUMN full_name\n",
	}[list]
	return strings.Replace(yaml, anchor, anchor+"  - "+strconv.Quote(stmt)+"\n", 1)
}

// TestPlanShowsWhatNewColumnsBecome: SET NOT NULL and an index on new
// columns, written plainly, pass plan, which prints each step at its
// phase with its lock.
func TestPlanShowsWhatNewColumnsBecome(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	exec1(t, dsn, seedUsers)
	r := cli(t, 30*time.Second, nil, "plan", "--config", writeConfig(t, withNewColumnsFirstClass(usersConfig(dsn))))
	if r.code != 0 {
		t.Fatalf("plan refused the running example with NOT NULL and an index\n%s", r)
	}
	mustContain(t, r,
		`once verify starts (after the backfill): CREATE INDEX CONCURRENTLY users_last ON users USING btree (last_name) (SHARE UPDATE EXCLUSIVE: blocks neither reads nor writes`,
		`after the hand-over, before the cut-over: ALTER TABLE "public"."users" ADD CONSTRAINT "cdcbackfill_not_null_first_name" CHECK ("first_name" IS NOT NULL) NOT VALID (ACCESS EXCLUSIVE, for a moment: no scan`,
		`VALIDATE CONSTRAINT "cdcbackfill_not_null_first_name" (SHARE UPDATE EXCLUSIVE: reads the table, blocks neither reads nor writes)`,
		`in the cut-over, after the contract statements: ALTER TABLE "public"."users" ALTER COLUMN "first_name" SET NOT NULL (no scan`)
}
