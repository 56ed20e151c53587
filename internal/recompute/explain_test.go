package recompute

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func TestExplainRange(t *testing.T) {
	if os.Getenv("EXPLAIN") == "" {
		t.Skip("set EXPLAIN=1")
	}
	dsn := pgtest.NewDatabase(t)
	ctx := context.Background()
	conn, _ := pgx.Connect(ctx, dsn)
	for _, s := range []string{`CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text, first_name text, last_name text)`,
		`INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'u' FROM generate_series(1, 200000) g`, `VACUUM ANALYZE users`} {
		if _, err := conn.Exec(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	tb, err := Inspect(ctx, conn, "public", "users", []Column{{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"}, {Name: "last_name", Expr: "split_part(full_name, ' ', 2)"}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		lo := fmt.Sprint(1000 + i*40000)
		hi := fmt.Sprint(1000 + i*40000 + 20000)
		rows, err := conn.Query(ctx, "EXPLAIN (ANALYZE, BUFFERS) "+tb.fastUpdateSQL(true), lo, hi)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var l string
			rows.Scan(&l)
			if os.Getenv("EXPLAIN") == "all" || strings.Contains(l, "Execution Time") {
				fmt.Println(l)
			}
		}
	}
}
