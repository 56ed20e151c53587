package exprcheck

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

const probeTable = `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, x text, created_at timestamptz, span interval);
CREATE SEQUENCE s`

func TestProbe(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, probeTable); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		expr     string
		volatile string // the finding's What, or ""
		stable   string
		setting  string // a setting the stable finding names
		notOfRow bool
	}{
		{expr: "split_part(full_name, ' ', 1)"},
		{expr: "upper(x)"},
		{expr: "x || 'a'"},
		{expr: "users.x || 'a'"},
		{expr: "(created_at AT TIME ZONE 'UTC')::date"},
		// text || bigint is anytextcat, a stable SQL function; the server
		// inlines it to textcat('b', id::text), immutable for an integer.
		{expr: "'b' || id"},
		{expr: "split_part(full_name, ' ', 1) || random()::text", volatile: "volatile function random"},
		{expr: "nextval('s')", volatile: "volatile function nextval"},
		{expr: "clock_timestamp()::text", volatile: "volatile function clock_timestamp"},
		{expr: "gen_random_uuid()::text || x", volatile: "volatile function gen_random_uuid"},
		{expr: "now()::text", stable: "stable function now"},
		{expr: "created_at::text", stable: "timestamptz output", setting: "TimeZone"},
		{expr: "'b' || created_at", stable: "stable operator || on timestamptz (its output)", setting: "TimeZone"},
		{expr: "to_char(created_at, 'YYYY')", stable: "stable function to_char", setting: "lc_time"},
		{expr: "created_at::date", stable: "cast from timestamptz to date by stable function date", setting: "TimeZone"},
		{expr: "span::text", stable: "interval output", setting: "IntervalStyle"},
		{expr: "count(*)", notOfRow: true},
		{expr: "generate_series(1, 2)", notOfRow: true},
	}
	p, err := OpenProbe(ctx, conn, "public", "users")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for _, c := range cases {
		e, err := Parse(c.expr)
		if err != nil {
			t.Fatalf("%q: %v", c.expr, err)
		}
		v, err := p.Check(ctx, e)
		var notOfRow *NotOfRowError
		if c.notOfRow {
			if !errors.As(err, &notOfRow) {
				t.Errorf("%q: error %v, want NotOfRowError", c.expr, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%q: %v", c.expr, err)
		}
		if got := whats(v.Volatile); got != c.volatile {
			t.Errorf("%q: volatile %q, want %q", c.expr, got, c.volatile)
		}
		if got := whats(v.Stable); got != c.stable {
			t.Errorf("%q: stable %q, want %q", c.expr, got, c.stable)
		}
		if c.setting != "" && (len(v.Stable) == 0 || v.Stable[0].Values[c.setting] == "") {
			t.Errorf("%q: %+v, want setting %s with its value", c.expr, v.Stable, c.setting)
		}
	}
	assertAccessShareOnly(t, ctx, dsn)
}

// The probe, still open, holds nothing on the table but ACCESS SHARE.
func assertAccessShareOnly(t *testing.T, ctx context.Context, dsn string) {
	t.Helper()
	other, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(ctx)
	rows, err := other.Query(ctx, `SELECT mode FROM pg_locks WHERE relation = 'public.users'::regclass AND pid <> pg_backend_pid()`)
	if err != nil {
		t.Fatal(err)
	}
	modes, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(modes, ",") != "AccessShareLock" {
		t.Errorf("locks on the table: %v, want AccessShareLock only", modes)
	}
}

func whats(fs []Finding) string {
	w := make([]string, len(fs))
	for i, f := range fs {
		w[i] = f.What
	}
	return strings.Join(w, "; ")
}
