package phases

import (
	"context"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/internal/sqlcheck"
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

// minServerVersion is the oldest server the daemon runs on
// (server_version_num).
const minServerVersion = 150000

// addColumnRE finds the columns an expand statement adds.
var addColumnRE = regexp.MustCompile(`(?i)\bADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)`)

// AddedColumns lists the column names the statements add.
func AddedColumns(stmts []string) map[string]bool {
	added := map[string]bool{}
	for _, s := range stmts {
		for _, m := range addColumnRE.FindAllStringSubmatch(s, -1) {
			name := m[1]
			if strings.HasPrefix(name, `"`) {
				name = strings.ReplaceAll(name[1:len(name)-1], `""`, `"`)
			} else {
				name = strings.ToLower(name)
			}
			switch strings.ToLower(name) {
			case "constraint", "primary", "unique", "check", "foreign", "exclude":
				continue
			}
			added[name] = true
		}
	}
	return added
}

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

	var version int
	var versionText string
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int, current_setting('server_version')").Scan(&version, &versionText); err != nil {
		return nil, fmt.Errorf("read the server's version: %w", err)
	}
	if version < minServerVersion {
		r.fail("server version", fmt.Sprintf("PostgreSQL %s found; cdcbackfill needs PostgreSQL %d or later (pgoutput's origin message and the replication functions it uses)", versionText, minServerVersion/10000),
			fmt.Sprintf("upgrade the server to PostgreSQL %d or later", minServerVersion/10000))
		return r, nil
	}
	r.ok("PostgreSQL " + versionText)

	var walLevel string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		return nil, fmt.Errorf("read wal_level: %w", err)
	}
	if walLevel != "logical" {
		r.fail("wal_level", fmt.Sprintf("wal_level is %q, logical replication needs \"logical\"", walLevel),
			"ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")
	} else {
		r.ok("wal_level is logical")
	}

	st, err := state.Store{Name: cfg.Name}.Load(ctx, conn)
	switch {
	case err == nil:
		r.State = st
	case errors.Is(err, state.ErrNoMigration):
	default:
		return nil, err
	}

	schema, name := cfg.TableIdent()
	cols := make([]recompute.Column, len(cfg.Columns))
	for i, c := range cfg.Columns {
		cols[i] = recompute.Column{Name: c.Name, Expr: c.Expr}
	}
	t, err := recompute.Inspect(ctx, conn, schema, name, cols)
	switch {
	case errors.Is(err, recompute.ErrNoTable):
		r.fail("table", fmt.Sprintf("table %s.%s does not exist", schema, name), "check `table` (schema.table) and the database in database.dsn")
		return r, nil
	case errors.Is(err, recompute.ErrNoPrimaryKey):
		r.fail("primary key", fmt.Sprintf("table %s.%s has no primary key; the backfill walks the table by key and the stream names rows by key", schema, name),
			fmt.Sprintf("add one: ALTER TABLE %s ADD PRIMARY KEY (...)", pgx.Identifier{schema, name}.Sanitize()))
		return r, nil
	case err != nil:
		return nil, err
	}
	r.Table = t
	r.ok(fmt.Sprintf("table %s exists", t.Ident()))
	keys := make([]string, len(t.Key))
	for i, k := range t.Key {
		keys[i] = k.Name + " " + k.Type
	}
	r.ok("primary key (" + strings.Join(keys, ", ") + ")")

	r.checkReplicaIdentity(t)
	r.checkColumns(cfg, t)
	r.checkExpressions(ctx, conn, t)
	r.checkReplication(ctx, conn, cfg)
	r.checkPrivileges(ctx, conn, t)
	r.checkStatements(ctx, conn, cfg)
	r.checkServerFeatures(ctx, conn, cfg, t)

	if r.Table != nil {
		lo, hi, rows, err := t.Bounds(ctx, conn)
		if err != nil {
			return nil, err
		}
		if rows == 0 && hi != nil {
			rows = countBriefly(ctx, conn, t)
		}
		r.Lo, r.Hi, r.Rows = lo, hi, rows
	}
	return r, nil
}

// checkReplicaIdentity: the stream names a changed row by the table's
// replica identity, which must hold the primary key; with none, adding the
// table to a publication would make PostgreSQL refuse its UPDATEs and
// DELETEs.
func (r *Report) checkReplicaIdentity(t *recompute.Table) {
	fix := fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY DEFAULT", t.IdentityOf)
	of := "table " + t.IdentityOf
	if t.IdentityOf != t.Ident() {
		of = fmt.Sprintf("%s, part of %s,", t.IdentityOf, t.Ident())
	}
	switch t.ReplicaIdentity {
	case recompute.IdentityKey, recompute.IdentityFull:
		r.ok("replica identity: " + string(t.ReplicaIdentity))
	case recompute.IdentityOtherIndex:
		r.fail("replica identity", fmt.Sprintf("%s has REPLICA IDENTITY USING INDEX of an index other than its primary key; the stream would name changed rows by that index, the backfill and applier by the primary key", of), fix)
	default:
		r.fail("replica identity", fmt.Sprintf("%s has no replica identity (REPLICA IDENTITY NOTHING, or no primary key); once it is in the migration's publication PostgreSQL would refuse the application's UPDATEs and DELETEs on it", of),
			fix+" (with a primary key)")
	}
}

func (r *Report) checkColumns(cfg *config.Config, t *recompute.Table) {
	added := AddedColumns(cfg.Expand)
	for _, c := range t.Columns {
		switch {
		case t.Exists[c.Name]:
			r.ok(fmt.Sprintf("column %s exists", c.Name))
		case added[c.Name]:
			r.ok(fmt.Sprintf("column %s is added by expand", c.Name))
		default:
			r.fail("column "+c.Name, fmt.Sprintf("column %q neither exists in %s nor is added by an expand statement", c.Name, t.Ident()),
				fmt.Sprintf("add it in expand: ALTER TABLE %s ADD COLUMN %s <type>", t.Ident(), c.Name))
		}
	}
}

// checkExpressions proves each expression is one expression (sqlcheck),
// then lets PostgreSQL check it over the row by preparing a query.
func (r *Report) checkExpressions(ctx context.Context, conn *pgx.Conn, t *recompute.Table) {
	allValid := true
	for _, c := range t.Columns {
		name := "expression for " + c.Name
		if err := sqlcheck.Expression(c.Expr); err != nil {
			r.fail(name, fmt.Sprintf("columns.%s: %v", c.Name, err), "write a single SQL expression over the row, e.g. split_part(full_name, ' ', 1)")
			allValid = false
			continue
		}
		sd, err := conn.Prepare(ctx, "", "SELECT ("+c.Expr+") AS _cdcb_check FROM "+t.Ident()+" LIMIT 0")
		if err == nil && len(sd.Fields) != 1 {
			err = fmt.Errorf("it yields %d values, want 1", len(sd.Fields))
		}
		if err != nil {
			r.fail(name, fmt.Sprintf("columns.%s: %s", c.Name, err), "fix the expression: it must be valid SQL over the columns of "+t.Ident())
			allValid = false
			continue
		}
		r.ok(name + " is valid SQL over the row")
	}
	if allValid && len(t.MissingColumns()) == 0 {
		// Every target exists: prepare the real statements, which also
		// checks that each expression's type fits its column.
		for _, sql := range []string{t.RangeSQL(true), t.KeysSQL()} {
			if _, err := conn.Prepare(ctx, "", sql); err != nil {
				r.fail("recompute statement", err.Error(), "make each expression's type assignable to its column")
				return
			}
		}
		r.ok("recompute statement prepares")
	}
}

func (r *Report) checkReplication(ctx context.Context, conn *pgx.Conn, cfg *config.Config) {
	var super, repl bool
	if err := conn.QueryRow(ctx, `SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user`).Scan(&super, &repl); err != nil {
		r.fail("role", err.Error(), "")
		return
	}
	if super || repl {
		r.ok("role may replicate")
	} else {
		r.fail("role", "the role has neither REPLICATION nor SUPERUSER and cannot create or read a replication slot",
			"ALTER ROLE <role> REPLICATION")
	}

	var exists, active bool
	var slotDB *string
	err := conn.QueryRow(ctx, `SELECT true, active, database FROM pg_replication_slots WHERE slot_name = $1`, cfg.SlotName()).Scan(&exists, &active, &slotDB)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		r.fail("replication slot", err.Error(), "")
		return
	}
	owned := r.State != nil && r.State.SlotLSN != nil && !r.State.Phase.Ended()
	switch {
	case exists && !owned:
		r.fail("replication slot", fmt.Sprintf("a replication slot named %q already exists and is not this migration's", cfg.SlotName()),
			fmt.Sprintf("choose another `name`, or drop the slot if it is left over: SELECT pg_drop_replication_slot('%s')", cfg.SlotName()))
	case exists:
		r.ok(fmt.Sprintf("replication slot %s exists (this migration's)", cfg.SlotName()))
	default:
		var free int
		if err := conn.QueryRow(ctx, `SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)`).Scan(&free); err != nil {
			r.fail("replication slot", err.Error(), "")
			return
		}
		if free < 1 {
			r.fail("replication slot", "no replication slot is free (max_replication_slots is used up)",
				"drop an unused slot, or raise max_replication_slots and restart PostgreSQL")
		} else {
			r.ok(fmt.Sprintf("a replication slot is free (%d free)", free))
		}
	}
	var keep string
	if err := conn.QueryRow(ctx, `SHOW max_slot_wal_keep_size`).Scan(&keep); err == nil && keep == "-1" {
		r.warn("max_slot_wal_keep_size", "is unlimited: a daemon that stops for good leaves a slot that holds WAL until the disk fills",
			"ALTER SYSTEM SET max_slot_wal_keep_size = '50GB' (a size your disk can hold); SELECT pg_reload_conf()")
	}
}

// checkServerFeatures says what the server's version gives the stream:
// where the daemon's own writes are filtered, what a failover does to the
// slot, and whether an idle slot can be invalidated.
func (r *Report) checkServerFeatures(ctx context.Context, conn *pgx.Conn, cfg *config.Config, t *recompute.Table) {
	if _, why, err := originNone(ctx, conn, cfg, t.Ident()); err != nil {
		r.fail("stream", err.Error(), "")
	} else {
		r.ok("stream: " + why)
	}
	if failover, why, err := failoverSlot(ctx, conn); err != nil {
		r.fail("failover", err.Error(), "")
	} else if failover {
		r.ok("failover: " + why)
	} else {
		r.add("info", "failover", why, "")
	}
	if idle, err := idleSlotTimeout(ctx, conn); err != nil {
		r.fail("idle slot timeout", err.Error(), "")
	} else if idle != "" {
		r.warn("idle slot timeout", fmt.Sprintf("idle_replication_slot_timeout is %s: a slot no daemon reads for that long is invalidated, and `cdcbackfill recover` must then backfill again", idle),
			"keep a daemon running (systemd Restart=on-failure, a standby daemon), or raise idle_replication_slot_timeout for the migration")
	}
}

// checkStatements says whether the contract can wait until nothing uses
// the old column (pg_stat_statements).
func (r *Report) checkStatements(ctx context.Context, conn *pgx.Conn, cfg *config.Config) {
	old := DroppedColumns(cfg.Contract)
	if len(old) == 0 {
		return
	}
	if _, err := statementsView(ctx, conn); err != nil {
		r.add("info", "old column usage", fmt.Sprintf("not watched: %v; the contract then relies on parity alone to tell that nothing still writes %s", err, strings.Join(old, ", ")),
			"CREATE EXTENSION pg_stat_statements (with shared_preload_libraries = 'pg_stat_statements') to have the contract wait until no statement uses it")
		return
	}
	r.ok(fmt.Sprintf("old column usage: pg_stat_statements shows the statements that still use %s; the contract waits (auto) or needs approve --force (manual) while any runs", strings.Join(old, ", ")))
}

func (r *Report) checkPrivileges(ctx context.Context, conn *pgx.Conn, t *recompute.Table) {
	var canUpdate, owns, canCreate bool
	err := conn.QueryRow(ctx, `SELECT has_table_privilege($1::regclass, 'SELECT, UPDATE'),
		pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = $1::regclass), 'USAGE'),
		has_database_privilege(current_database(), 'CREATE')`, t.Ident()).Scan(&canUpdate, &owns, &canCreate)
	if err != nil {
		r.fail("privileges", err.Error(), "")
		return
	}
	if !canUpdate {
		r.fail("privileges", fmt.Sprintf("the role may not SELECT and UPDATE %s", t.Ident()), fmt.Sprintf("GRANT SELECT, UPDATE ON %s TO <role>", t.Ident()))
	}
	if !owns {
		r.fail("privileges", fmt.Sprintf("the role does not own %s: the expand DDL and CREATE PUBLICATION need the owner", t.Ident()),
			fmt.Sprintf("run as the owner, or GRANT <owner role> TO <role>"))
	}
	if !canCreate {
		r.fail("privileges", "the role may not CREATE in this database (the publication and the state schema cdcbackfill)",
			"GRANT CREATE ON DATABASE <db> TO <role>")
	}
	if canUpdate && owns && canCreate {
		r.ok("privileges: UPDATE, owner of the table, CREATE on the database")
	}
}

// Print writes the checks, then what run would do.
func (r *Report) Print(w io.Writer, cfg *config.Config) {
	for _, c := range r.Checks {
		if c.Status == "ok" {
			fmt.Fprintf(w, "ok    %s\n", c.Name)
			continue
		}
		fmt.Fprintf(w, "%-5s %s: %s\n", c.Status, c.Name, c.Problem)
		if c.Fix != "" {
			fmt.Fprintf(w, "      fix: %s\n", c.Fix)
		}
	}
	if !r.OK() {
		fmt.Fprintln(w, "\nplan: problems found; nothing was changed")
		return
	}
	fmt.Fprintf(w, "\nplan for migration %q on %s\n", cfg.Name, r.Table.Ident())
	if r.State != nil {
		fmt.Fprintf(w, "  state: phase %s (rows done %d of %d)\n", r.State.Phase, r.State.RowsDone, r.State.RowsTotal)
	}
	keys := make([]string, len(r.Table.Key))
	for i, k := range r.Table.Key {
		keys[i] = k.Name
	}
	if r.Rows < 0 {
		fmt.Fprintf(w, "  key: (%s); rows unknown (never analyzed: ANALYZE %s)", strings.Join(keys, ", "), r.Table.Ident())
	} else {
		fmt.Fprintf(w, "  key: (%s); about %d rows", strings.Join(keys, ", "), r.Rows)
	}
	if r.Lo != nil {
		fmt.Fprintf(w, ", keys %s to %s", strings.Join(r.Lo, ","), strings.Join(r.Hi, ","))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "  1. expand (each under lock_timeout "+cfg.DDL.LockTimeout.String()+", retried):")
	printList(w, cfg.Expand)
	fmt.Fprintf(w, "  2. backfill: slot and publication %s, batches of %d rows, then keep in sync from the stream:\n", cfg.SlotName(), cfg.Backfill.BatchSize)
	for _, c := range cfg.Columns {
		fmt.Fprintf(w, "       %s = %s\n", c.Name, c.Expr)
	}
	if cfg.DualWrite.Detect == "auto" {
		fmt.Fprintf(w, "  3. sync until dual-write is detected: %d application writes of the new columns that needed no correction, and none that did, over %s of stream time\n",
			cfg.DualWrite.MinEvidence, cfg.DualWrite.QuietPeriod)
	} else {
		fmt.Fprintln(w, "  3. sync until dual-write is approved (cdcbackfill approve)")
	}
	fmt.Fprintf(w, "  4. verify: the application owns the new columns (never overwritten); one pass over the table, then parity proven clean for %s\n", cfg.ContractPolicy.Hold)
	fmt.Fprintf(w, "  5. contract (%s): one transaction under the table's ACCESS EXCLUSIVE lock (lock_timeout %s, kept below deadlock_timeout) checks what the stream delivered, then runs:\n",
		cfg.ContractPolicy.Mode, cfg.ContractPolicy.LockTimeout)
	printList(w, cfg.Contract)
	fmt.Fprintln(w, "plan: all checks passed; nothing was changed")
}

func printList(w io.Writer, stmts []string) {
	if len(stmts) == 0 {
		fmt.Fprintln(w, "       (none)")
	}
	for _, s := range stmts {
		fmt.Fprintf(w, "       %s\n", s)
	}
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
