package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

// TestServerFeatures: what each PostgreSQL version offers the stream is
// used where it exists and said by plan: the walsender's origin filter
// (16+, not where something else replicates into the table), failover
// slots (17+), and the idle slot timeout that can invalidate a stopped
// daemon's slot (18).
func TestServerFeatures(t *testing.T) {
	srv := pgtest.Shared(t)
	major := srv.Major()
	if major == 0 {
		t.Skip("the server's version is unknown (a server from the environment)")
	}
	dsn, pool := seed(t, 2000)
	cfgPath := writeConfig(t, usersConfig(dsn))
	r := cli(t, 30*time.Second, nil, "plan", "--config", cfgPath)
	if r.code != 0 {
		t.Fatalf("plan\n%s", r)
	}
	if major >= 16 {
		mustContain(t, r, "stream: the walsender drops the daemon's own transactions (origin 'none'")
	} else {
		mustContain(t, r, "PostgreSQL 15 has no origin filter in the walsender")
	}
	if major >= 17 {
		mustContain(t, r, "failover: the slot is created with failover")
	} else {
		mustContain(t, r, "a promoted standby has no copy of the slot", "cdcbackfill recover")
	}

	if major >= 16 {
		// Another tool's origin: its changes would be filtered too.
		exec1(t, dsn, `SELECT pg_replication_origin_create('other_tool_1')`)
		r := cli(t, 30*time.Second, nil, "plan", "--config", cfgPath)
		exec1(t, dsn, `SELECT pg_replication_origin_drop('other_tool_1')`)
		mustContain(t, r, "other replication origins exist (other_tool_1)")
	}
	if major >= 18 {
		ctx := context.Background()
		admin, err := pgx.Connect(ctx, srv.DSN())
		if err != nil {
			t.Fatal(err)
		}
		defer admin.Close(ctx)
		set := func(v string) {
			if _, err := admin.Exec(ctx, "ALTER SYSTEM SET idle_replication_slot_timeout = '"+v+"'"); err != nil {
				t.Fatal(err)
			}
			if _, err := admin.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
				t.Fatal(err)
			}
		}
		set("10min")
		r := cli(t, 30*time.Second, nil, "plan", "--config", cfgPath)
		set("0")
		mustContain(t, r, "idle_replication_slot_timeout is 10min")
	}

	d := startDaemon(t, cfgPath)
	waitFor(t, time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	if major >= 16 && !strings.Contains(d.output(), "stream: the walsender drops the daemon's own transactions") {
		t.Errorf("the daemon does not say it filters server-side\n%s", d.output())
	}
	failover := query[bool](t, pool, `SELECT coalesce((to_jsonb(s) ->> 'failover')::boolean, false) FROM pg_replication_slots s WHERE slot_name = 'cdcbackfill_split_full_name'`)
	if failover != (major >= 17) {
		t.Errorf("slot failover = %v on PostgreSQL %d", failover, major)
	}
	d.kill()
}
