package recompute

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

// TestFastRangeWalksEveryRow: batches of the fast path, chained by their
// last key, cover every row exactly up to hi, for a one-column and a
// composite key, and report the rows each covered.
func TestFastRangeWalksEveryRow(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name, ddl, seed string
		hi              Key
	}{
		{"bigint", `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, first_name text, last_name text)`,
			`INSERT INTO users SELECT g * 3, 'a' || g || ' b', NULL, NULL FROM generate_series(1, 1000) g`, Key{"3000"}},
		{"composite", `CREATE TABLE users (t text, id int, full_name text, first_name text, last_name text, PRIMARY KEY (t, id))`,
			`INSERT INTO users SELECT 't' || (g % 7), g, 'a' || g || ' b', NULL, NULL FROM generate_series(1, 1000) g`, Key{"t6", "1000"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, err := pgx.Connect(ctx, pgtest.NewDatabase(t))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			for _, s := range []string{c.ddl, c.seed} {
				if _, err := conn.Exec(ctx, s); err != nil {
					t.Fatal(err)
				}
			}
			tb, err := Inspect(ctx, conn, "public", "users", []Column{{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"}, {Name: "last_name", Expr: "split_part(full_name, ' ', 2)"}})
			if err != nil {
				t.Fatal(err)
			}
			var lo Key
			var scanned, corrected int64
			for i := 0; ; i++ {
				res, err := tb.FastRange(ctx, conn, lo, c.hi, 97)
				if err != nil {
					t.Fatal(err)
				}
				scanned += res.Scanned
				corrected += res.Corrected
				if res.Scanned < 97 {
					break
				}
				lo = res.Last
				if i > 100 {
					t.Fatal("no end")
				}
			}
			var bad int64
			if err := conn.QueryRow(ctx, `SELECT count(*) FROM users WHERE first_name IS DISTINCT FROM split_part(full_name, ' ', 1)`).Scan(&bad); err != nil {
				t.Fatal(err)
			}
			if bad != 0 || scanned != 1000 || corrected != 1000 {
				t.Errorf("out of parity %d, scanned %d, corrected %d; want 0, 1000, 1000", bad, scanned, corrected)
			}
			// Again: everything in parity, nothing written.
			res, err := tb.FastRange(ctx, conn, nil, c.hi, 5000)
			if err != nil || res.Corrected != 0 || res.Scanned != 1000 {
				t.Errorf("second pass: %+v, %v", res, err)
			}
		})
	}
}
