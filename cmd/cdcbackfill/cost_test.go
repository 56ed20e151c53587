package main

import (
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

// plan says what the backfill will cost before it starts, and the WAL it
// announces is what the backfill then writes (within 25%): the user reads
// a figure to plan disk and standbys by, not a guess. The pace is the
// configured cap when there is one, else sampled from the table.
func TestPlanEstimatesCost(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	exec1(t, dsn, `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text)`,
		`INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'u' || g || '@x' FROM generate_series(1, 50000) g`,
		`VACUUM ANALYZE users`)
	cfgPath := writeConfig(t, usersConfig(dsn))
	r := cli(t, 30*time.Second, nil, "plan", "--config", cfgPath)
	if r.code != 0 {
		t.Fatalf("plan failed\n%s", r)
	}
	line := regexp.MustCompile(`(?m)^info  backfill: about ([0-9.]+) (kB|MB|GB) of WAL over about \d+ s at [0-9.]+[kM]? rows/s; the slot holds at most 1\.0 GB \(throttle\.max_slot_lag\)$`)
	m := line.FindStringSubmatch(r.stdout + r.stderr)
	if m == nil {
		t.Fatalf("no backfill cost line\n%s", r)
	}
	mustContain(t, r, "info  backfill WAL estimate: 50000 rows x ", "pace: uncapped, from a read-only sample of 20000 rows in key order: ",
		"info  WAL room: ", "/pg_wal on this host has ", "info  backfill WAL: no physical standby must receive it")
	estimate, _ := strconv.ParseFloat(m[1], 64)
	estimate *= map[string]float64{"kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m[2]]

	capped := cli(t, 30*time.Second, []string{"CDCBACKFILL_BACKFILL_MAX_ROWS_PER_SECOND=1000"}, "plan", "--config", cfgPath)
	mustContain(t, capped, "of WAL over about 50 s at 1.0k rows/s", "pace: backfill.max_rows_per_second")

	// A server that would invalidate the slot before the daemon's bound.
	exec1(t, dsn, "ALTER SYSTEM SET max_slot_wal_keep_size = '64MB'", "SELECT pg_reload_conf()")
	t.Cleanup(func() { exec1(t, dsn, "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()") })
	mustContain(t, cli(t, 30*time.Second, nil, "plan", "--config", cfgPath),
		"warn  max_slot_wal_keep_size: 64MB: the server invalidates the slot once it holds more, before the daemon's bound of 1.0 GB")
	exec1(t, dsn, "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")

	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	lsn0 := query[int64](t, pool, `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8`)
	d := startDaemon(t, cfgPath)
	waitFor(t, 2*time.Minute, "phase sync", func() bool { return phase(t, pool) == "sync" })
	written := float64(query[int64](t, pool, `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8`) - lsn0)
	d.kill()
	ratio := estimate / written
	t.Logf("plan estimated %.1f MB of WAL; the backfill wrote %.1f MB (ratio %.2f)", estimate/(1<<20), written/(1<<20), ratio)
	if ratio < 0.8 || ratio > 1.25 {
		t.Errorf("plan estimated %.1f MB of WAL, the backfill wrote %.1f MB: ratio %.2f, want within 0.8..1.25", estimate/(1<<20), written/(1<<20), ratio)
	}
}
