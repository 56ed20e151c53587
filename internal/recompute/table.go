package recompute

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// Column is a new column and its SQL expression over the same row.
type Column struct {
	Name string
	Expr string
	// NotNull: the migration makes the column NOT NULL, so a row where it
	// is NULL fails the checks (verify, the stream's after the hand-over,
	// the cut-over's) whatever the expression says, and is found and
	// reported before any constraint is validated. Corrections are not
	// changed: the daemon only ever writes the expression.
	NotNull bool
}

// KeyColumn is one column of the primary key, with the type to cast its
// text form back to.
type KeyColumn struct {
	Name string
	Type string // format_type() of the column, e.g. "bigint", "uuid"
}

// IntegerKey says whether the key is one column of an integer type: its
// values can be split into ranges by value.
func (t *Table) IntegerKey() bool { return len(t.Key) == 1 && isInteger(t.Key[0].Type) }

func isInteger(typ string) bool { return typ == "smallint" || typ == "integer" || typ == "bigint" }

// CompareKeys orders keys as the primary key's index does where a column
// is an integer, and by bytes elsewhere (the server's collation may order
// text otherwise: the order serves locality, never correctness).
func (t *Table) CompareKeys(a, b Key) int {
	for i := range min(len(a), len(b)) {
		if i < len(t.Key) && isInteger(t.Key[i].Type) {
			x, err1 := strconv.ParseInt(a[i], 10, 64)
			y, err2 := strconv.ParseInt(b[i], 10, 64)
			if err1 == nil && err2 == nil {
				if c := cmp.Compare(x, y); c != 0 {
					return c
				}
				continue
			}
		}
		if c := strings.Compare(a[i], b[i]); c != 0 {
			return c
		}
	}
	return cmp.Compare(len(a), len(b))
}

// Table is the migrated table as the statements need it.
type Table struct {
	Schema, Name string
	Key          []KeyColumn // primary key, in index order
	Columns      []Column    // new columns, sorted by name
	Exists       map[string]bool
	// ReplicaIdentity is what the table's changes name a row by in the
	// replication stream: IdentityKey (the primary key: DEFAULT, or USING
	// INDEX of the primary key), IdentityFull, IdentityOtherIndex or
	// IdentityNothing. The stream needs the primary key among the columns
	// it names. A partitioned table or one with inheritance children is
	// the worst of them all; IdentityOf names the relation that decided.
	ReplicaIdentity Identity
	IdentityOf      string
}

// Identity is a table's replica identity, as the stream sees it.
type Identity string

const (
	IdentityKey        Identity = "primary key"
	IdentityFull       Identity = "full"
	IdentityOtherIndex Identity = "another index"
	IdentityNothing    Identity = "nothing"
)

// KeyNames are the primary key's column names, in index order.
func (t *Table) KeyNames() []string {
	names := make([]string, len(t.Key))
	for i, k := range t.Key {
		names[i] = k.Name
	}
	return names
}

// Ident is the quoted, schema-qualified table name.
func (t *Table) Ident() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }

// Querier is what the statements need: a connection, a pool or a transaction.
type Querier = dbconn.Querier

// ErrNoTable and ErrNoPrimaryKey are returned by Inspect.
var (
	ErrNoTable      = errors.New("table not found")
	ErrNoPrimaryKey = errors.New("table has no primary key")
)

const keyColumnsSQL = `
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_index i
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1::regclass AND i.indisprimary
ORDER BY k.ord`

const columnsSQL = `
SELECT attname FROM pg_attribute
WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped`

// InspectMigration reads the table of a migration's config, with its new
// columns and their expressions, from the catalog (Inspect).
func InspectMigration(ctx context.Context, q Querier, cfg *config.Config) (*Table, error) {
	schema, name := cfg.TableIdent()
	cols := make([]Column, len(cfg.Columns))
	for i, c := range cfg.Columns {
		cols[i] = Column{Name: c.Name, Expr: c.Expr}
	}
	return Inspect(ctx, q, schema, name, cols)
}

// Inspect reads the table's key and columns from the catalog.
func Inspect(ctx context.Context, q Querier, schema, name string, cols []Column) (*Table, error) {
	t := &Table{Schema: schema, Name: name, Columns: cols, Exists: map[string]bool{}}
	var found bool
	err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p'))`, schema, name).Scan(&found)
	if err != nil {
		return nil, fmt.Errorf("look up table %s.%s: %w", schema, name, err)
	}
	if !found {
		return nil, fmt.Errorf("%w: %s.%s", ErrNoTable, schema, name)
	}
	rows, err := q.Query(ctx, keyColumnsSQL, t.Ident())
	if err != nil {
		return nil, fmt.Errorf("read primary key of %s: %w", t.Ident(), err)
	}
	for rows.Next() {
		var k KeyColumn
		if err := rows.Scan(&k.Name, &k.Type); err != nil {
			return nil, err
		}
		t.Key = append(t.Key, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read primary key of %s: %w", t.Ident(), err)
	}
	if len(t.Key) == 0 {
		return nil, fmt.Errorf("%w: %s", ErrNoPrimaryKey, t.Ident())
	}
	rows, err = q.Query(ctx, columnsSQL, t.Ident())
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", t.Ident(), err)
	}
	for rows.Next() {
		var c string
		if err := rows.Scan(&c); err != nil {
			return nil, err
		}
		t.Exists[c] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", t.Ident(), err)
	}
	if err := t.readReplicaIdentity(ctx, q); err != nil {
		return nil, err
	}
	return t, nil
}

// identityRank orders identities from harmless to refused: a table is as
// good as the worst of its partitions and inheritance children.
var identityRank = map[Identity]int{IdentityKey: 0, IdentityFull: 1, IdentityOtherIndex: 2, IdentityNothing: 3}

// readReplicaIdentity sets ReplicaIdentity and IdentityOf from the table and
// every partition or inheritance child: each has its own replica identity,
// and the publication covers them all.
func (t *Table) readReplicaIdentity(ctx context.Context, q Querier) error {
	rows, err := q.Query(ctx, `WITH RECURSIVE tree AS (
		SELECT $1::regclass::oid AS oid
		UNION ALL SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid
	)
	SELECT c.oid = $1::regclass, format('%I.%I', n.nspname, c.relname), c.relreplident::text,
		EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
		COALESCE((SELECT i.indisprimary FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident), false)
	FROM tree JOIN pg_class c ON c.oid = tree.oid JOIN pg_namespace n ON n.oid = c.relnamespace
	WHERE c.relkind = 'r'`, t.Ident())
	if err != nil {
		return fmt.Errorf("read replica identity of %s: %w", t.Ident(), err)
	}
	defer rows.Close()
	t.ReplicaIdentity, t.IdentityOf = IdentityKey, t.Ident()
	for rows.Next() {
		var self, hasKey, identIsKey bool
		var rel, ident string
		if err := rows.Scan(&self, &rel, &ident, &hasKey, &identIsKey); err != nil {
			return err
		}
		if self {
			rel = t.Ident()
		}
		var id Identity
		switch {
		case ident == "d" && hasKey || ident == "i" && identIsKey:
			id = IdentityKey
		case ident == "f":
			id = IdentityFull
		case ident == "i":
			id = IdentityOtherIndex
		default: // NOTHING, or DEFAULT without a primary key (a child table)
			id = IdentityNothing
		}
		if identityRank[id] > identityRank[t.ReplicaIdentity] {
			t.ReplicaIdentity, t.IdentityOf = id, rel
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read replica identity of %s: %w", t.Ident(), err)
	}
	return nil
}

// Refresh re-reads which columns exist (after the expand DDL).
func (t *Table) Refresh(ctx context.Context, q Querier) error {
	fresh, err := Inspect(ctx, q, t.Schema, t.Name, t.Columns)
	if err != nil {
		return err
	}
	*t = *fresh
	return nil
}

// MissingColumns lists new columns that do not exist in the table yet.
func (t *Table) MissingColumns() []string {
	var missing []string
	for _, c := range t.Columns {
		if !t.Exists[c.Name] {
			missing = append(missing, c.Name)
		}
	}
	return missing
}

// keyList is the key columns qualified by the table's name (not an alias,
// so an expression that names the table still resolves).
func (t *Table) keyList() string {
	parts := make([]string, len(t.Key))
	for i, k := range t.Key {
		parts[i] = t.Ident() + "." + pgx.Identifier{k.Name}.Sanitize()
	}
	return strings.Join(parts, ", ")
}

// slots is "_cdcb_k0, _cdcb_k1" prefixed by alias: the daemon's own names for
// key values, chosen so they cannot capture a column an expression uses.
func (t *Table) slots(alias string, suffix string) string {
	parts := make([]string, len(t.Key))
	for i := range t.Key {
		parts[i] = fmt.Sprintf("%s_cdcb_k%d%s", alias, i, suffix)
	}
	return strings.Join(parts, ", ")
}

// keyParams casts parameters $first.. back to the key's types.
func (t *Table) keyParams(first int) string {
	parts := make([]string, len(t.Key))
	for i, k := range t.Key {
		parts[i] = fmt.Sprintf("$%d::text::%s", first+i, k.Type)
	}
	return strings.Join(parts, ", ")
}

// newColumns is `"a", "b"` (unqualified: the expressions see the row's
// columns unqualified too).
func (t *Table) newColumns() string {
	parts := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		parts[i] = pgx.Identifier{c.Name}.Sanitize()
	}
	return strings.Join(parts, ", ")
}

// exprs is "(expr_a), (expr_b)". User expressions are the one place SQL text
// is composed; plan proves each is one expression of the row first
// (internal/exprcheck).
func (t *Table) exprs() string {
	parts := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		parts[i] = "(" + c.Expr + ")"
	}
	return strings.Join(parts, ", ")
}

// row wraps a list as a row constructor (ROW() so one column works too).
func row(list string) string { return "ROW(" + list + ")" }

// outOfParity is the condition that a row's new columns differ from their
// expressions.
func (t *Table) outOfParity() string {
	return row(t.newColumns()) + " IS DISTINCT FROM " + row(t.exprs())
}

// failsCheck is outOfParity, or a NOT NULL column that is NULL: what the
// read-only checks report.
func (t *Table) failsCheck() string {
	cond := t.outOfParity()
	for _, c := range t.Columns {
		if c.NotNull {
			cond += " OR " + pgx.Identifier{c.Name}.Sanitize() + " IS NULL"
		}
	}
	return "(" + cond + ")"
}

// RequireNotNull marks the named new columns NotNull (see Column).
func (t *Table) RequireNotNull(names []string) {
	for i := range t.Columns {
		for _, n := range names {
			if t.Columns[i].Name == n {
				t.Columns[i].NotNull = true
			}
		}
	}
}

func (t *Table) setList() string {
	parts := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		parts[i] = pgx.Identifier{c.Name}.Sanitize() + " = (" + c.Expr + ")"
	}
	return strings.Join(parts, ", ")
}

// SourceColumns lists the table's columns the expressions read, as
// PostgreSQL resolves them: a temporary view over the expressions, created
// in a transaction that is rolled back, records a dependency on each.
func (t *Table) SourceColumns(ctx context.Context, conn *pgx.Conn) ([]string, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(context.Background())
	cols := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		cols[i] = fmt.Sprintf("(%s) AS _cdcb_c%d", c.Expr, i)
	}
	if _, err := tx.Exec(ctx, "CREATE TEMPORARY VIEW _cdcb_sources AS SELECT "+strings.Join(cols, ", ")+" FROM "+t.Ident()); err != nil {
		return nil, fmt.Errorf("find the columns the expressions read: %w", err)
	}
	rows, err := tx.Query(ctx, `SELECT DISTINCT a.attname FROM pg_depend d
		JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
		JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
		WHERE r.ev_class = 'pg_temp._cdcb_sources'::regclass AND d.refobjid = $1::regclass AND d.refobjsubid > 0
		ORDER BY 1`, t.Ident())
	if err != nil {
		return nil, fmt.Errorf("find the columns the expressions read: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}
