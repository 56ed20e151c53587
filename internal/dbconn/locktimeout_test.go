package dbconn_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// TestLockTimeoutFloor: what the server holds after SetLockTimeout. A
// sub-millisecond time-out becomes 1ms, never 0 (no time-out at all), in
// the session and in a transaction.
func TestLockTimeoutFloor(t *testing.T) {
	ctx := context.Background()
	conn, err := dbconn.Connect(ctx, pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	show := func(q dbconn.Querier) string {
		t.Helper()
		var s string
		if err := q.QueryRow(ctx, "SHOW lock_timeout").Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	cases := []struct {
		d    time.Duration
		want string
	}{
		{500 * time.Microsecond, "1ms"},
		{0, "1ms"},
		{10 * time.Millisecond, "10ms"},
		{1500 * time.Microsecond, "1ms"},
		{2 * time.Second, "2s"},
	}
	for _, c := range cases {
		if err := dbconn.SetLockTimeout(ctx, conn, c.d, false); err != nil {
			t.Fatal(err)
		}
		if got := show(conn); got != c.want {
			t.Errorf("session: SetLockTimeout(%s): SHOW lock_timeout = %s, want %s", c.d, got, c.want)
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if err := dbconn.SetLockTimeout(ctx, tx, c.d, true); err != nil {
				return err
			}
			if got := show(tx); got != c.want {
				t.Errorf("local: SetLockTimeout(%s): SHOW lock_timeout = %s, want %s", c.d, got, c.want)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}
