#!/usr/bin/env bash
# profile-sync: the daemon's CPU per application write in sync, with a CPU
# profile, at one fixed rate. Quicker than BenchmarkSync (one setup, one
# run, about a minute) and meant for trying a change to the daemon's hot
# path: it prints pgbench's rate, the daemon's CPU per write, and the top of
# the profile. Production durability (fsync, synchronous_commit,
# full_page_writes on). The migration is packaging/demo-migration.yaml; its
# sync phase lasts while the load writes full_name only.
#
#   make profile                       # 3000 writes/s for 20s
#   RATE=1800 DUR=30 make profile
#   CDCBACKFILL_SYNC_FLUSH_INTERVAL=100ms make profile   # any key, as its variable
#
# Needs initdb and pg_ctl of PostgreSQL 15+ (PG_BINDIR, default Debian's
# 15; e.g. a server internal/pgserver fetched into
# /var/cache/cdcbackfill/postgres), pgbench and psql of any version, and
# runs the server as the postgres user when root.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
RATE=${RATE:-3000}
DUR=${DUR:-20}
PORT=${PORT:-55432}
DAEMON=$PWD/bin/cdcbackfill
# The fetched 16-18 servers carry no client programs: take pgbench and psql
# from an installed PostgreSQL then (any version talks to them).
client() {
  for c in "$BIN/$1" $(command -v "$1") /usr/lib/postgresql/*/bin/"$1"; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
}
PGBENCH=$(client pgbench)
PSQL=$(client psql)
for p in "$BIN/initdb" "$BIN/pg_ctl" "$PGBENCH" "$PSQL" "$DAEMON"; do
  [ -x "$p" ] || { echo "profile-sync: initdb, pg_ctl, pgbench, psql or bin/cdcbackfill not found (PG_BINDIR=$BIN; make build)" >&2; exit 2; }
done

work=$(mktemp -d /tmp/cdcbackfill-profile.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown postgres "$work"; fi

as_pg "$BIN/initdb" -D "$work/data" -U postgres -A trust >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 256MB
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
CONF
as_pg "$BIN/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
dpid=""
cleanup() {
  [ -n "$dpid" ] && kill -9 "$dpid" 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work/data" # the profile and the logs stay
}
trap cleanup EXIT

dsn="postgres://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"
"$PSQL" -q "$dsn" <<SQL
CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text);
INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'u' || g || '@example.com' FROM generate_series(1, 200000) g;
VACUUM ANALYZE users;
SQL
# The running example, as shipped; the environment points it at this server
# (and overrides any other key the caller set, see the top).
CDCBACKFILL_DATABASE_DSN=$dsn CDCBACKFILL_HTTP_LISTEN='' CDCBACKFILL_CPUPROFILE=$work/cpu.prof \
  "$DAEMON" run --config packaging/demo-migration.yaml >"$work/daemon.log" 2>&1 &
dpid=$!
for _ in $(seq 600); do
  st=$(CDCBACKFILL_DATABASE_DSN=$dsn "$DAEMON" status --config packaging/demo-migration.yaml --json 2>/dev/null || true)
  grep -q '"phase": *"sync"' <<<"$st" && break
  kill -0 "$dpid" 2>/dev/null || { echo "profile-sync: the daemon exited; its log:" >&2; tail -20 "$work/daemon.log" >&2; exit 1; }
  sleep 0.5
done
grep -q '"phase": *"sync"' <<<"$st" || { echo "profile-sync: the migration did not reach sync in 5 minutes; its log: $work/daemon.log" >&2; exit 1; }
cat >"$work/update.sql" <<'S'
\set id random(1, 200000)
UPDATE users SET full_name = 'first' || :id || ' x' || random() WHERE id = :id;
S
ticks() { awk '{print $14 + $15}' "/proc/$dpid/stat"; }
hz=$(getconf CLK_TCK)
before=$(ticks)
out=$("$PGBENCH" -n -M prepared -c 4 -j 2 -R "$RATE" -T "$DUR" -f "$work/update.sql" "$dsn" 2>&1)
after=$(ticks)
txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
echo "$out" | grep -E '^tps|^latency average'
awk -v t=$((after - before)) -v hz="$hz" -v n="$txns" 'BEGIN {
  printf "daemon process: %.0f ms of CPU for %d writes = %.1f µs per write\n", t * 1000 / hz, n, t * 1e6 / hz / n }'
kill -TERM "$dpid"
for _ in $(seq 100); do kill -0 "$dpid" 2>/dev/null || { dpid=""; break; }; sleep 0.1; done
[ -z "$dpid" ] || { echo "profile-sync: the daemon did not stop in 10s: no profile" >&2; exit 1; }
go tool pprof -top -nodecount=25 "$DAEMON" "$work/cpu.prof" 2>/dev/null | sed -n '4,40p'
echo "profile: $work/cpu.prof (go tool pprof $DAEMON $work/cpu.prof)"
