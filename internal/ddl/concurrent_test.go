package ddl

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

// TestIndexBuildOutlivesAnOldSnapshot: a reporting session holds a
// REPEATABLE READ snapshot (on another table) longer than the build's
// time-out. The first try fails and leaves an INVALID index; IF NOT EXISTS
// would skip it on the retry. The build drops it, tries again once the
// snapshot is gone, and ends with a valid index.
func TestIndexBuildOutlivesAnOldSnapshot(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, sql := range []string{
		`CREATE TABLE users (id bigint PRIMARY KEY, email text)`,
		`INSERT INTO users SELECT g, 'u' || g || '@example.com' FROM generate_series(1, 2000) g`,
		`CREATE TABLE report (x int)`,
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	reporter, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer reporter.Close(ctx)
	for _, sql := range []string{`BEGIN ISOLATION LEVEL REPEATABLE READ`, `SELECT count(*) FROM report`} {
		if _, err := reporter.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}

	var log pgtest.LogBuffer
	b := IndexBuild{
		SQL:        `CREATE INDEX CONCURRENTLY IF NOT EXISTS users_email ON users (email)`,
		Name:       "users_email",
		Timeout:    300 * time.Millisecond,
		MaxRetries: 20,
		Log:        slog.New(slog.NewTextHandler(&log, nil)),
	}
	type outcome struct {
		tries int
		err   error
	}
	done := make(chan outcome, 1)
	go func() {
		tries, err := b.Run(ctx, conn)
		done <- outcome{tries, err}
	}()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(log.String(), "dropping the INVALID index") {
		if time.Now().After(deadline) {
			t.Fatalf("no retry over the INVALID leftover within a minute\n%s", log.String())
		}
		time.Sleep(20 * time.Millisecond) // polling a condition
	}
	if _, err := reporter.Exec(ctx, `COMMIT`); err != nil {
		t.Fatal(err)
	}
	var out outcome
	select {
	case out = <-done:
	case <-time.After(time.Minute):
		t.Fatalf("the build did not end within a minute of the snapshot's end\n%s", log.String())
	}
	if out.err != nil {
		t.Fatalf("build: %v\n%s", out.err, log.String())
	}
	if out.tries < 2 {
		t.Errorf("%d tries, want at least 2 (the first one timed out)", out.tries)
	}
	var valid bool
	if err := conn.QueryRow(ctx, `SELECT indisvalid FROM pg_index WHERE indexrelid = 'users_email'::regclass`).Scan(&valid); err != nil {
		t.Fatal(err)
	}
	if !valid {
		t.Fatal("users_email is INVALID after the build reported success")
	}
	// Run again (a restart): a valid index is done, not built twice.
	if tries, err := b.Run(ctx, conn); err != nil || tries != 1 {
		t.Errorf("second run: %d tries, %v; want 1 try and no error", tries, err)
	}
}

// TestIndexBuildRefusesDuplicates: a unique build that finds duplicates
// fails at once, naming the index, and leaves no INVALID index behind.
func TestIndexBuildRefusesDuplicates(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, sql := range []string{
		`CREATE TABLE users (id bigint PRIMARY KEY, email text)`,
		`INSERT INTO users SELECT g, 'same' FROM generate_series(1, 10) g`,
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	b := IndexBuild{SQL: `CREATE UNIQUE INDEX CONCURRENTLY users_email_key ON users (email)`, Name: "users_email_key", MaxRetries: 5}
	tries, err := b.Run(ctx, conn)
	if err == nil || !strings.Contains(err.Error(), "users_email_key") || tries != 1 {
		t.Fatalf("got %d tries, %v; want one try and an error naming the index", tries, err)
	}
	if st, err := LookupIndex(ctx, conn, "", "users_email_key"); err != nil || st != IndexMissing {
		t.Errorf("index state %v (%v) after the failed build, want missing", st, err)
	}
}
