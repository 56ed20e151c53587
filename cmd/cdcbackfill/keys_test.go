package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

// TestKeyTypes: primary keys of one column (integer, text, uuid) and
// composite keys all work through backfill and the stream; workers > 1
// split an integer key.
func TestKeyTypes(t *testing.T) {
	cases := []struct {
		name, table, seed, update, extra string
	}{
		{"bigint, 3 workers",
			`CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text)`,
			`INSERT INTO users SELECT g, 'a' || g || ' b' || g, 'e' FROM generate_series(1, 30000) g`,
			`UPDATE users SET full_name = 'x' || id || ' y' WHERE id % 7 = 0`,
			"backfill:\n  workers: 3\n  batch_size: 1000\n"},
		{"text",
			`CREATE TABLE users (id text PRIMARY KEY, full_name text, email text)`,
			`INSERT INTO users SELECT 'k,''' || g, 'a' || g || ' b' || g, 'e' FROM generate_series(1, 20000) g`,
			`UPDATE users SET full_name = 'x y' || id WHERE id LIKE '%7'`, ""},
		{"uuid",
			`CREATE TABLE users (id uuid PRIMARY KEY, full_name text, email text)`,
			`INSERT INTO users SELECT md5(g::text)::uuid, 'a' || g || ' b' || g, 'e' FROM generate_series(1, 20000) g`,
			`UPDATE users SET full_name = 'x y' || id WHERE id::text LIKE '%a'`, ""},
		{"composite (tenant, id)",
			`CREATE TABLE users (id int, tenant text, full_name text, email text, PRIMARY KEY (tenant, id))`,
			`INSERT INTO users SELECT g, 't' || (g % 13), 'a' || g || ' b' || g, 'e' FROM generate_series(1, 20000) g`,
			`UPDATE users SET full_name = 'x y' || id WHERE id % 5 = 0`, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dsn := pgtest.NewDatabase(t)
			exec1(t, dsn, c.table, c.seed, "ANALYZE users")
			pool, err := pgxpool.New(context.Background(), dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer pool.Close()
			d := startDaemon(t, writeConfig(t, usersConfig(dsn)+c.extra))
			defer func() {
				if t.Failed() {
					t.Log(d.output())
				}
			}()
			waitFor(t, 30*time.Second, "phase sync", func() bool { return phase(t, pool) == "sync" })
			exec1(t, dsn, c.update)
			end := query[string](t, pool, `SELECT pg_current_wal_insert_lsn()::text`)
			waitFor(t, time.Minute, "slot caught up", func() bool { return caughtUp(t, pool, end) })
			if n := mismatches(t, pool); n != 0 {
				t.Errorf("%d rows out of parity\n%s", n, d.output())
			}
			if strings.Contains(c.name, "workers") {
				if n := query[int64](t, pool, `SELECT jsonb_array_length(ranges) FROM cdcbackfill.migrations`); n != 3 {
					t.Errorf("%d ranges, want 3", n)
				}
			}
		})
	}
}

// TestReplicaIdentity: a table whose replica identity is FULL (every column
// in each change, nulls and unchanged TOASTed values among them) or the
// primary key's index named explicitly migrates like any other, and the
// application's UPDATEs and DELETEs keep working once the table is in the
// migration's publication.
func TestReplicaIdentity(t *testing.T) {
	for _, c := range []struct{ name, identity string }{
		{"full", "ALTER TABLE users REPLICA IDENTITY FULL"},
		{"using the primary key's index", "ALTER TABLE users REPLICA IDENTITY USING INDEX users_pkey"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dsn := pgtest.NewDatabase(t)
			exec1(t, dsn, `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text, bio text)`,
				// bio: 40kB of md5 text, stored out of line (TOAST) and unchanged by the updates below.
				`INSERT INTO users SELECT g, 'a' || g || ' b' || g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'e' END,
					(SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 1250) i) FROM generate_series(1, 2000) g`,
				c.identity, "ANALYZE users")
			pool, err := pgxpool.New(context.Background(), dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer pool.Close()
			d := startDaemon(t, writeConfig(t, usersConfig(dsn)))
			defer func() {
				if t.Failed() {
					t.Log(d.output())
				}
			}()
			waitFor(t, 30*time.Second, "phase sync", func() bool { return phase(t, pool) == "sync" })
			exec1(t, dsn, `UPDATE users SET full_name = 'x' || id || ' y' WHERE id % 7 = 0`,
				`UPDATE users SET email = NULL WHERE id % 11 = 0`,
				`DELETE FROM users WHERE id % 13 = 0`,
				`INSERT INTO users VALUES (5000, 'new one', NULL, NULL)`)
			end := query[string](t, pool, `SELECT pg_current_wal_insert_lsn()::text`)
			waitFor(t, time.Minute, "slot caught up", func() bool { return caughtUp(t, pool, end) })
			if n := mismatches(t, pool); n != 0 {
				t.Errorf("%d rows out of parity\n%s", n, d.output())
			}
			if n := query[int64](t, pool, `SELECT count(*) FROM users WHERE id % 7 = 0 AND first_name <> 'x' || id`); n != 0 {
				t.Errorf("%d updated rows not recomputed", n)
			}
		})
	}
}
