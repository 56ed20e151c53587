package ddl

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/proto"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// copyName is the temporary copy of the table that statements are tried on.
const copyName = "cdcbackfill_ddl_copy"

var copyIdent = pgx.Identifier{"pg_temp", copyName}.Sanitize()

// TryOnCopy asks the server what only it knows (is a default volatile, is
// a type change binary-coercible, does SET NOT NULL find a validated
// check): it runs each statement on a temporary copy of the table
// schema.name, one row in it, and reads whether the copy's relfilenode
// changed (a rewrite), whether a scan of it began, and the lock it took.
// The real table is only read (ACCESS SHARE, briefly); the copy lives in
// this session and is dropped before TryOnCopy returns.
//
// setup runs first, on the copy, its failures ignored (for the contract
// and rollback lists: the expand statements that will have run). Each
// statement runs in a transaction of its own, so the locks read are its
// own; it commits on the copy so the next statement sees its effect, as it
// will on the table. tried[i] is nil where stmts[i] was not tried: it is
// not an ALTER TABLE of this table alone. An error means the copy could
// not be made (privileges): the parse tree then decides alone.
func TryOnCopy(ctx context.Context, conn *pgx.Conn, schema, name string, setup, stmts []*Statement) (tried []*Tried, err error) {
	table := pgx.Identifier{schema, name}.Sanitize()
	if _, err := conn.Exec(ctx, "DROP TABLE IF EXISTS "+copyIdent); err != nil {
		return nil, fmt.Errorf("drop an old copy: %w", err)
	}
	oid, err := makeCopy(ctx, conn, table)
	if err != nil {
		return nil, err
	}
	defer func() {
		if _, derr := conn.Exec(context.WithoutCancel(ctx), "DROP TABLE IF EXISTS "+copyIdent); derr != nil && err == nil {
			err = fmt.Errorf("drop the copy: %w", derr)
		}
	}()
	for _, s := range setup {
		if sql, ok := s.onCopy(schema, name); ok {
			_, _ = conn.Exec(ctx, sql) // the state differs then; each statement's own failure says so
		}
	}
	tried = make([]*Tried, len(stmts))
	for i, s := range stmts {
		sql, ok := s.onCopy(schema, name)
		if !ok {
			continue
		}
		t, err := tryOne(ctx, conn, oid, sql)
		if err != nil {
			return nil, err
		}
		tried[i] = t
	}
	return tried, nil
}

// makeCopy creates the copy: the table's columns, defaults, indexes and
// NOT NULLs (LIKE ... INCLUDING ALL), its CHECK constraints re-added as they
// are (LIKE would copy a NOT VALID one as validated, and SET NOT NULL would
// then skip the scan it does on the table), and one row of the table.
func makeCopy(ctx context.Context, conn *pgx.Conn, table string) (uint32, error) {
	var oid uint32
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+copyIdent+" (LIKE "+table+" INCLUDING ALL EXCLUDING CONSTRAINTS)"); err != nil {
			return fmt.Errorf("create a temporary copy of %s: %w", table, err)
		}
		if err := tx.QueryRow(ctx, "SELECT $1::regclass::oid", copyIdent).Scan(&oid); err != nil {
			return err
		}
		checks, err := query(ctx, tx, pgx.RowToStructByPos[struct{ Name, Def string }], `SELECT conname, pg_get_constraintdef(oid)
			FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c' ORDER BY conname`, table)
		if err != nil {
			return fmt.Errorf("read the checks of %s: %w", table, err)
		}
		for _, c := range checks {
			// The definition is the server's own text of the constraint.
			if _, err := tx.Exec(ctx, "ALTER TABLE "+copyIdent+" ADD CONSTRAINT "+pgx.Identifier{c.Name}.Sanitize()+" "+c.Def); err != nil {
				return fmt.Errorf("copy check %q: %w", c.Name, err)
			}
		}
		cols, err := query(ctx, tx, pgx.RowTo[string], `SELECT attname FROM pg_attribute
			WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum`, table)
		if err != nil {
			return fmt.Errorf("read the columns of %s: %w", table, err)
		}
		quoted := make([]string, len(cols))
		for i, c := range cols {
			quoted[i] = pgx.Identifier{c}.Sanitize()
		}
		list := strings.Join(quoted, ", ")
		// One row, so the statement meets real data. An empty table gives
		// none: a rewrite or a scan shows on an empty copy all the same.
		if _, err := tx.Exec(ctx, "SAVEPOINT row"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO "+copyIdent+" ("+list+") OVERRIDING SYSTEM VALUE SELECT "+list+" FROM "+table+" LIMIT 1"); err != nil {
			_, err = tx.Exec(ctx, "ROLLBACK TO SAVEPOINT row") // a row that fails a NOT VALID check: the copy stays empty
			return err
		}
		return nil
	})
	return oid, err
}

// query collects the rows of a query.
func query[T any](ctx context.Context, tx pgx.Tx, fn pgx.RowToFunc[T], sql string, args ...any) ([]T, error) {
	rows, err := tx.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, fn)
}

// tryOne runs one statement on the copy in its own transaction.
func tryOne(ctx context.Context, conn *pgx.Conn, oid uint32, sql string) (*Tried, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	// Nothing else uses the copy; what it might wait for is elsewhere.
	if _, err := tx.Exec(ctx, dbconn.LockTimeoutSQL(time.Second, true)+"; SET LOCAL statement_timeout = '10s'"); err != nil {
		return nil, err
	}
	const measure = "SELECT relfilenode, pg_stat_get_xact_numscans(oid) FROM pg_class WHERE oid = $1"
	var fileBefore, fileAfter uint32
	var scansBefore, scansAfter int64
	if err := tx.QueryRow(ctx, measure, oid).Scan(&fileBefore, &scansBefore); err != nil {
		return nil, fmt.Errorf("read the copy: %w", err)
	}
	if _, err := tx.Exec(ctx, "SAVEPOINT try"); err != nil {
		return nil, err
	}
	if _, err := tx.Exec(ctx, sql); err != nil {
		// A statement can fail on the row after reading it (SET NOT NULL
		// on a column not backfilled yet): the scan counter, which no
		// rollback takes back, says whether it did.
		if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT try"); rerr != nil {
			return nil, rerr
		}
		if merr := tx.QueryRow(ctx, measure, oid).Scan(&fileAfter, &scansAfter); merr != nil {
			return nil, fmt.Errorf("read the copy: %w", merr)
		}
		return &Tried{Err: err, Scanned: scansAfter > scansBefore}, nil
	}
	if err := tx.QueryRow(ctx, measure, oid).Scan(&fileAfter, &scansAfter); err != nil {
		return nil, fmt.Errorf("read the copy: %w", err)
	}
	modes, err := query(ctx, tx, pgx.RowTo[string], `SELECT mode FROM pg_locks
		WHERE locktype = 'relation' AND relation = $1 AND pid = pg_backend_pid()`, oid)
	if err != nil {
		return nil, fmt.Errorf("read the copy's locks: %w", err)
	}
	t := &Tried{Rewrote: fileAfter != fileBefore, Scanned: scansAfter > scansBefore}
	for _, m := range modes {
		t.Lock = max(t.Lock, pgLocksModes[m])
	}
	return t, tx.Commit(ctx)
}

// onCopy is the statement with the table renamed to the copy in its parse
// tree, if it is an ALTER TABLE that names no relation but the table.
func (s *Statement) onCopy(schema, name string) (string, bool) {
	at := s.tree.Stmts[0].Stmt.GetAlterTableStmt()
	if at == nil || at.Objtype != pg_query.ObjectType_OBJECT_TABLE {
		return "", false
	}
	tree := proto.Clone(s.tree).(*pg_query.ParseResult)
	only := true
	rangeVars(tree, func(rv *pg_query.RangeVar) {
		if !relationOf(rv).Is(schema, name) {
			only = false
			return
		}
		rv.Schemaname, rv.Relname = "pg_temp", copyName
	})
	if !only {
		return "", false
	}
	sql, err := pg_query.Deparse(tree)
	return sql, err == nil
}
