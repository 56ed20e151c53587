package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/workload"
)

// leastPrivilege are the grants README documents for the daemon's role,
// beside the application's role that owns the table.
func leastPrivilege(db string, origins bool) []string {
	grants := []string{
		"CREATE ROLE app_owner NOLOGIN",
		"ALTER TABLE users OWNER TO app_owner",
		"ALTER TABLE expected OWNER TO app_owner",
		"CREATE ROLE migrator LOGIN REPLICATION PASSWORD 'migrator-pw'",
		"GRANT app_owner TO migrator",
		"GRANT CREATE ON DATABASE " + pgx.Identifier{db}.Sanitize() + " TO migrator",
	}
	if origins {
		grants = append(grants, "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_drop(text), pg_replication_origin_session_setup(text) TO migrator")
	}
	return grants
}

// TestLeastPrivilege: the whole migration as a role that is not superuser,
// with the documented grants, with and without the replication origin
// functions.
func TestLeastPrivilege(t *testing.T) {
	for _, origins := range []bool{true, false} {
		t.Run(fmt.Sprintf("origins=%v", origins), func(t *testing.T) {
			dsn, pool := seed(t, 20000)
			seedExpected(t, pool)
			db := query[string](t, pool, "SELECT current_database()")
			exec1(t, dsn, leastPrivilege(db, origins)...)
			defer exec1(t, dsn, "DROP OWNED BY migrator CASCADE", "DROP ROLE migrator", "REASSIGN OWNED BY app_owner TO postgres", "DROP OWNED BY app_owner", "DROP ROLE app_owner")
			migratorDSN := pgtest.Shared(t).DSNFor(db, "migrator", "migrator-pw")
			a := startApp(t, pool, 2, 20000)
			defer a.Stop()
			d := startDaemon(t, writeConfig(t, autoConfig(migratorDSN)))
			waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
			a.Deploy(workload.WritesBoth)
			finishesAsWritten(t, d, a, pool, 3*time.Minute)
			warned := strings.Contains(d.output(), "may not set a replication origin")
			if warned == origins {
				t.Errorf("origin warning %v with origin grants %v\n%s", warned, origins, d.output())
			}
			if strings.Contains(d.output(), "migrator-pw") {
				t.Error("the password appears in the log")
			}
			// The daemon's own writes: with origins the stream skips them
			// (the 20k backfilled rows never come back as events); without,
			// they come back and are re-checked, changing nothing.
			events := query[int64](t, pool, `SELECT sync_events FROM cdcbackfill.migrations`)
			if origins && events >= 20000 {
				t.Errorf("%d stream events with origins: the daemon's own writes came back", events)
			}
			if !origins && events < 20000 {
				t.Errorf("%d stream events without origins: expected the backfill's writes back", events)
			}
			t.Logf("stream events %d, application transactions %d", events, ops(a))
		})
	}
}
