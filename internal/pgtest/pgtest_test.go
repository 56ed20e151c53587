package pgtest_test

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/cdcbackfill/cdcbackfill/internal/pgserver"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func queryString(t *testing.T, conn *pgx.Conn, sql string, args ...any) string {
	t.Helper()
	var s string
	if err := conn.QueryRow(context.Background(), sql, args...).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

func TestServer(t *testing.T) {
	srv := pgtest.Shared(t)
	t.Logf("kind %s, PostgreSQL %d, bin dir %q, DSN %s", srv.Kind(), srv.Major(), srv.BinDir(), srv.DSN())
	conn := connect(t, srv.DSN())
	if got := queryString(t, conn, "SHOW wal_level"); got != "logical" {
		t.Errorf("wal_level = %q, want logical", got)
	}
	num, err := strconv.Atoi(queryString(t, conn, "SHOW server_version_num"))
	if err != nil {
		t.Fatal(err)
	}
	if num/10000 != srv.Major() || srv.Major() < 15 {
		t.Errorf("server_version_num = %d, Major() = %d, want the same major, 15 or later", num, srv.Major())
	}
	// The version asked for is the version run, unless a DSN decides.
	if v := os.Getenv(pgserver.EnvVersion); v != "" && srv.Kind() != "env" && v != strconv.Itoa(srv.Major()) {
		t.Errorf("%s=%s, but the server is PostgreSQL %d", pgserver.EnvVersion, v, srv.Major())
	}
}

func TestNewDatabase(t *testing.T) {
	a, b := pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	if a == b {
		t.Fatalf("both DSNs are %s", a)
	}
	dbA := queryString(t, connect(t, a), "SELECT current_database()")
	dbB := queryString(t, connect(t, b), "SELECT current_database()")
	if dbA == dbB {
		t.Fatalf("both connect to database %s", dbA)
	}
}

func TestDSNFor(t *testing.T) {
	srv := pgtest.Shared(t)
	dsn := pgtest.NewDatabase(t)
	conn := connect(t, dsn)
	db := queryString(t, conn, "SELECT current_database()")
	if _, err := conn.Exec(context.Background(), "CREATE ROLE pgtest_dsnfor LOGIN PASSWORD 'secret'"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c := connect(t, srv.DSN())
		_, _ = c.Exec(context.Background(), "DROP ROLE pgtest_dsnfor")
	})
	other := connect(t, srv.DSNFor(db, "pgtest_dsnfor", "secret"))
	if got := queryString(t, other, "SELECT current_user || '@' || current_database()"); got != "pgtest_dsnfor@"+db {
		t.Errorf("connected as %s", got)
	}
}

func TestDropDatabaseWithSlots(t *testing.T) {
	srv := pgtest.Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name, dsn, err := srv.CreateDatabase(ctx, "Drop-Me")
	if err != nil {
		t.Fatal(err)
	}
	conn := connect(t, dsn)
	for _, sql := range []string{
		"CREATE TABLE t (id int PRIMARY KEY)",
		"CREATE PUBLICATION p FOR ALL TABLES",
		"SELECT pg_create_logical_replication_slot('idle_slot', 'pgoutput')",
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}

	// A second slot held by a streaming walsender.
	repl, err := pgconn.Connect(ctx, dsn+"&replication=database")
	if err != nil {
		t.Fatal(err)
	}
	defer repl.Close(context.Background())
	if _, err := pglogrepl.CreateReplicationSlot(ctx, repl, "busy_slot", "pgoutput", pglogrepl.CreateReplicationSlotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := pglogrepl.StartReplication(ctx, repl, "busy_slot", 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'p'"},
	}); err != nil {
		t.Fatal(err)
	}
	admin := connect(t, srv.DSN())
	if n := queryString(t, admin, "SELECT count(*)::text FROM pg_replication_slots WHERE database = $1 AND active", name); n != "1" {
		t.Fatalf("%s active slots, want 1", n)
	}

	if err := srv.DropDatabase(ctx, name); err != nil {
		t.Fatal(err)
	}
	if n := queryString(t, admin, "SELECT count(*)::text FROM pg_database WHERE datname = $1", name); n != "0" {
		t.Errorf("database %s still exists", name)
	}
	if n := queryString(t, admin, "SELECT count(*)::text FROM pg_replication_slots WHERE database = $1", name); n != "0" {
		t.Errorf("%s slots left", n)
	}
	if err := srv.DropDatabase(ctx, name); err != nil {
		t.Errorf("dropping again: %v", err)
	}
}

func TestRestart(t *testing.T) {
	srv := pgtest.Shared(t)
	if srv.Kind() == "env" {
		t.Skip("restart is not supported for " + pgtest.EnvDSN)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dsn := pgtest.NewDatabase(t)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "CREATE TABLE kept AS SELECT 'still here' AS v"); err != nil {
		t.Fatal(err)
	}
	var db string
	if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&db); err != nil {
		t.Fatal(err)
	}
	conn.Close(ctx)

	before := srv.DSN()
	start := time.Now()
	if err := srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("restart took %s", time.Since(start))
	if srv.Kind() == "local" && srv.DSN() != before {
		t.Errorf("DSN changed from %s to %s", before, srv.DSN())
	}
	// A container may come back on another port: ask for a new DSN.
	if got := queryString(t, connect(t, srv.DSNFor(db, "", "")), "SELECT v FROM kept"); got != "still here" {
		t.Errorf("after restart: %q", got)
	}
}
