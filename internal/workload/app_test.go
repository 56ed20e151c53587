package workload_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/workload"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// With no migration running, a dual-writing application's rows hold
// exactly what the expected table says. A rename or delete may land on a
// sign-up not committed yet: it finds no row, and must record nothing, even
// when the sign-up commits before its next statement (the chaos suite once
// counted such a write as lost by the daemon). A statement trigger widens
// that window to 20 ms; before the fix most of the ten rounds met the case.
func TestExpectedRecordsOnlyWhatWasWritten(t *testing.T) {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, pgtest.NewDatabase(t)+"&pool_max_conns=16") // a connection for every writer
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	for _, sql := range []string{
		`CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text, first_name text, last_name text)`,
		`CREATE FUNCTION linger() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(0.02); RETURN NULL; END$$`,
		`CREATE TRIGGER linger AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH STATEMENT EXECUTE FUNCTION linger()`,
	} {
		if _, err := pool.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	// Rounds from one row each: a write picks its id among all so far, so
	// the newest sign-up is hit most while there are few.
	for round := range 10 {
		for _, sql := range []string{
			`TRUNCATE users`, `DROP TABLE IF EXISTS expected`,
			`INSERT INTO users (id, full_name, email, first_name, last_name) VALUES (1, 'a b', 'e', 'a', 'b')`,
		} {
			if _, err := pool.Exec(ctx, sql); err != nil {
				t.Fatal(err)
			}
		}
		if err := workload.CreateExpected(ctx, pool, "expected"); err != nil {
			t.Fatal(err)
		}
		app := workload.Start(pool, workload.Options{Writers: 8, MaxID: 1, Seed: uint64(round), Release: workload.WritesBoth,
			Mix: workload.Mix{SignUps: 1, Renames: 2, Deletes: 1}, Expected: "expected"})
		deadline := time.Now().Add(time.Minute)
		for total, _ := app.Transactions(); total < 400 && time.Now().Before(deadline); total, _ = app.Transactions() {
			time.Sleep(10 * time.Millisecond) // polling the count, not waiting for an effect
		}
		app.Stop()
		total, failed := app.Transactions()
		if failed > 0 {
			t.Fatalf("round %d: %d of %d transactions failed: %v", round, failed, total, app.Failures()[0].Err)
		}
		differ, rows, err := workload.DifferFromExpected(ctx, pool, "expected")
		if err != nil {
			t.Fatal(err)
		}
		if differ != 0 {
			t.Errorf("round %d: %d of %d rows differ from the expected table after %d transactions", round, differ, rows, total)
		}
	}
}
