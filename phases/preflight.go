package phases

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// Check is one line of `plan`: what was checked, and if it failed, the
// problem and the fix.
type Check struct {
	Name    string
	Status  string // ok | FAIL | warn
	Problem string
	Fix     string
}

// Report is what `plan` found and what `run` would do.
type Report struct {
	Checks []Check
	Table  *recompute.Table
	State  *state.Migration // nil when the migration has not started
	Lo, Hi recompute.Key
	Rows   int64
	// Settings are the values the expressions are evaluated with
	// ("TimeZone=UTC"): the database's and role's, as the daemon connects.
	Settings []string
	// Allowed is each statement the DDL rules refuse that the operator
	// allowed, with why it is refused: run logs them.
	Allowed []string
}

// OK is true when no check failed.
func (r *Report) OK() bool {
	for _, c := range r.Checks {
		if c.Status == "FAIL" {
			return false
		}
	}
	return true
}

// Err is the first failed check as an error, or nil.
func (r *Report) Err() error {
	for _, c := range r.Checks {
		if c.Status == "FAIL" {
			return fmt.Errorf("%s: %s (fix: %s)", c.Name, c.Problem, c.Fix)
		}
	}
	return nil
}

func (r *Report) ok(name string)                 { r.Checks = append(r.Checks, Check{Name: name, Status: "ok"}) }
func (r *Report) fail(name, problem, fix string) { r.add("FAIL", name, problem, fix) }
func (r *Report) warn(name, problem, fix string) { r.add("warn", name, problem, fix) }
func (r *Report) add(status, name, problem, fix string) {
	r.Checks = append(r.Checks, Check{Name: name, Status: status, Problem: problem, Fix: fix})
}

// A preflight check looks at one thing and adds its lines to the report.
// It returns stop when the checks after it cannot run (no connection, no
// table); an error only when the database could not be asked.
type check func(ctx context.Context, in *inspection) (stop bool, err error)

// preflight is every check, in the order plan prints them; adding one is a
// file with its function and a line here.
var preflight = []check{
	checkVersion,
	checkWALLevel,
	checkState,
	checkTable,
	checkReplicaIdentity,
	checkColumns,
	checkDDL,
	checkExpressions,
	checkReplication,
	checkStandbys,
	checkPrivileges,
	checkStatements,
	checkServerFeatures,
	checkBounds,
}

// inspection is what the checks share.
type inspection struct {
	r     *Report
	cfg   *config.Config
	conn  *pgx.Conn
	table *recompute.Table // set by checkTable
}

// minServerVersion is the oldest server the daemon runs on
// (server_version_num).
const minServerVersion = 150000

// Inspect checks the configuration against the database and changes
// nothing. Checks after a failed one that they depend on are left out.
func Inspect(ctx context.Context, cfg *config.Config) (*Report, error) {
	r := &Report{}
	conn, err := dbconn.Connect(ctx, cfg.Database.DSN)
	if err != nil {
		r.fail("connect", err.Error(), "check database.dsn (or CDCBACKFILL_DATABASE_DSN) and that the server answers")
		return r, nil
	}
	defer conn.Close(context.Background())
	r.ok("connect to " + dbconn.RedactDSN(cfg.Database.DSN))
	in := &inspection{r: r, cfg: cfg, conn: conn}
	for _, c := range preflight {
		stop, err := c(ctx, in)
		if err != nil {
			return nil, err
		}
		if stop {
			break
		}
	}
	return r, nil
}

// checkVersion refuses a server older than PostgreSQL 15.
func checkVersion(ctx context.Context, in *inspection) (bool, error) {
	var version int
	var versionText string
	if err := in.conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int, current_setting('server_version')").Scan(&version, &versionText); err != nil {
		return false, fmt.Errorf("read the server's version: %w", err)
	}
	if version < minServerVersion {
		in.r.fail("server version", fmt.Sprintf("PostgreSQL %s found; cdcbackfill needs PostgreSQL %d or later (pgoutput's origin message and the replication functions it uses)", versionText, minServerVersion/10000),
			fmt.Sprintf("upgrade the server to PostgreSQL %d or later", minServerVersion/10000))
		return true, nil
	}
	in.r.ok("PostgreSQL " + versionText)
	return false, nil
}

// checkWALLevel: logical decoding needs wal_level = logical.
func checkWALLevel(ctx context.Context, in *inspection) (bool, error) {
	var walLevel string
	if err := in.conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		return false, fmt.Errorf("read wal_level: %w", err)
	}
	if walLevel != "logical" {
		in.r.fail("wal_level", fmt.Sprintf("wal_level is %q, logical replication needs \"logical\"", walLevel),
			"ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")
	} else {
		in.r.ok("wal_level is logical")
	}
	return false, nil
}

// checkState reads the migration's state row, when it has started.
func checkState(ctx context.Context, in *inspection) (bool, error) {
	st, err := state.Store{Name: in.cfg.Name}.Load(ctx, in.conn)
	switch {
	case err == nil:
		in.r.State = st
	case errors.Is(err, state.ErrNoMigration):
	default:
		return false, err
	}
	return false, nil
}

// checkTable: the table exists and has a primary key; nothing else can be
// checked without them.
func checkTable(ctx context.Context, in *inspection) (bool, error) {
	schema, name := in.cfg.TableIdent()
	cols := make([]recompute.Column, len(in.cfg.Columns))
	for i, c := range in.cfg.Columns {
		cols[i] = recompute.Column{Name: c.Name, Expr: c.Expr}
	}
	t, err := recompute.Inspect(ctx, in.conn, schema, name, cols)
	switch {
	case errors.Is(err, recompute.ErrNoTable):
		in.r.fail("table", fmt.Sprintf("table %s.%s does not exist", schema, name), "check `table` (schema.table) and the database in database.dsn")
		return true, nil
	case errors.Is(err, recompute.ErrNoPrimaryKey):
		in.r.fail("primary key", fmt.Sprintf("table %s.%s has no primary key; the backfill walks the table by key and the stream names rows by key", schema, name),
			fmt.Sprintf("add one: ALTER TABLE %s ADD PRIMARY KEY (...)", pgx.Identifier{schema, name}.Sanitize()))
		return true, nil
	case err != nil:
		return false, err
	}
	in.r.Table, in.table = t, t
	in.r.ok(fmt.Sprintf("table %s exists", t.Ident()))
	keys := make([]string, len(t.Key))
	for i, k := range t.Key {
		keys[i] = k.Name + " " + k.Type
	}
	in.r.ok("primary key (" + strings.Join(keys, ", ") + ")")
	return false, nil
}

// checkBounds reads the key range and the row count plan prints.
func checkBounds(ctx context.Context, in *inspection) (bool, error) {
	lo, hi, rows, err := in.table.Bounds(ctx, in.conn)
	if err != nil {
		return false, err
	}
	if rows == 0 && hi != nil {
		rows = countBriefly(ctx, in.conn, in.table)
	}
	in.r.Lo, in.r.Hi, in.r.Rows = lo, hi, rows
	return false, nil
}

// countBriefly counts a table that was never analyzed, in chunks, giving
// up after a few seconds (-1: unknown) so plan stays quick on a big table.
func countBriefly(ctx context.Context, conn *pgx.Conn, t *recompute.Table) int64 {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := snapshot.CountRows(cctx, conn, t)
	if err != nil {
		return -1
	}
	return n
}
