package ddl

import (
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Finish is what the migration makes of its new columns, planned from the
// statements the user wrote where they read naturally (`SET NOT NULL`,
// `CREATE [UNIQUE] INDEX`, `ADD CONSTRAINT ... UNIQUE | FOREIGN KEY | CHECK`
// in expand or contract): each one in the form PostgreSQL allows without
// an outage, at the phase where it is safe.
//
//   - an index on new columns is built CONCURRENTLY once verify starts
//     (after the backfill: the backfill pays no index maintenance);
//   - a unique constraint is such an index, attached in the cut-over
//     (ADD CONSTRAINT ... UNIQUE USING INDEX, no scan);
//   - NOT NULL, CHECK and FOREIGN KEY are added NOT VALID and validated
//     (SHARE UPDATE EXCLUSIVE) before the cut-over, after the hand-over:
//     before it the old release writes rows without the new columns. NOT
//     NULL then costs no scan in the cut-over (SET NOT NULL uses the
//     validated check, which the cut-over drops).
//
// Every step is found done or not in the catalog, so a restart resumes
// each where it stood, and Undo removes what was built.
type Finish struct {
	Expand   []string // the expand statements as they run
	Contract []string // the contract statements as they run (the user's, less what was taken over)
	Attach   []string // the daemon's, in the cut-over after Contract: what attaches the steps built before it
	Indexes  []IndexStep
	Prepare  []ConstraintStep
	NotNull  []string // new columns made NOT NULL: verify checks them
	Undo     []Undo   // what abort drops
}

// Undo is a step's drop: an index (DROP INDEX CONCURRENTLY, outside a
// transaction) or a constraint of the table.
type Undo struct {
	Index        bool
	Schema, Name string
	SQL          string
}

// IndexStep is an index on new columns, built CONCURRENTLY.
type IndexStep struct {
	Schema, Name string
	SQL          string // CREATE [UNIQUE] INDEX CONCURRENTLY ...
	// Constraint, when set, is a unique constraint attached in the cut-over
	// with this index.
	Constraint string
}

// ConstraintStep is a constraint added NOT VALID, then validated.
type ConstraintStep struct {
	Name     string
	Add      string // ALTER TABLE ... ADD CONSTRAINT ... NOT VALID (brief ACCESS EXCLUSIVE, or SHARE ROW EXCLUSIVE for a foreign key)
	Validate string // ALTER TABLE ... VALIDATE CONSTRAINT (SHARE UPDATE EXCLUSIVE)
	What     string // for plan and status: "first_name NOT NULL"
	// AddLock is what Add takes on the table, for a moment: ACCESS
	// EXCLUSIVE, or SHARE ROW EXCLUSIVE (on both tables) for a foreign key.
	AddLock LockMode
}

// notNullCheck names the check that stands for a NOT NULL until the
// cut-over; a name PostgreSQL keeps whole (63 bytes).
func notNullCheck(column string) string { return truncName("cdcbackfill_not_null_" + column) }

// notNullName is the name PostgreSQL 18 gives a column's NOT NULL
// constraint: the one the daemon adds NOT VALID there stays as the
// column's own.
func notNullName(table, column string) string { return truncName(table + "_" + column + "_not_null") }

func truncName(n string) string {
	if len(n) > 63 {
		n = n[:63]
	}
	return n
}

// NotNullNotValid is the first server version (server_version_num) that
// adds a NOT NULL constraint NOT VALID: one step fewer under ACCESS
// EXCLUSIVE than the check that stands for it before.
const NotNullNotValid = 180000

// PlanFinish splits the statements: what it takes over, and what runs as
// written. table is the migrated table; newColumns are the columns the
// migration fills; server is server_version_num (0: unknown, the forms
// every supported version has).
func PlanFinish(expand, contract []*Statement, table Relation, newColumns []string, server int) (*Finish, error) {
	f := &Finish{}
	isTable := func(rv *pg_query.RangeVar) bool {
		return rv != nil && rv.Relname == table.Name && (rv.Schemaname == "" || rv.Schemaname == table.Schema)
	}
	isNew := func(c string) bool { return slices.Contains(newColumns, c) }
	tbl := table.String()
	for _, s := range expand {
		ix := s.tree.Stmts[0].Stmt.GetIndexStmt()
		if ix != nil && isTable(ix.Relation) && indexUses(ix, isNew) {
			step, err := indexStep(s, ix, table)
			if err != nil {
				return nil, err
			}
			f.Indexes = append(f.Indexes, step)
			continue
		}
		f.Expand = append(f.Expand, s.SQL)
	}
	var attach []string
	for _, s := range contract {
		n := s.tree.Stmts[0].Stmt
		if ix := n.GetIndexStmt(); ix != nil && isTable(ix.Relation) && indexUses(ix, isNew) {
			step, err := indexStep(s, ix, table)
			if err != nil {
				return nil, err
			}
			f.Indexes = append(f.Indexes, step)
			continue
		}
		at := n.GetAlterTableStmt()
		if at == nil || !isTable(at.Relation) || at.Objtype != pg_query.ObjectType_OBJECT_TABLE {
			f.Contract = append(f.Contract, s.SQL)
			continue
		}
		var kept []*pg_query.Node
		for _, c := range at.Cmds {
			cmd := c.GetAlterTableCmd()
			switch {
			case cmd.GetSubtype() == pg_query.AlterTableType_AT_SetNotNull && isNew(cmd.Name) && server >= NotNullNotValid:
				// 18: the NOT NULL itself, NOT VALID, then validated: the
				// cut-over has nothing left to do for it.
				col := pgx.Identifier{cmd.Name}.Sanitize()
				name := notNullName(table.Name, cmd.Name)
				f.NotNull = append(f.NotNull, cmd.Name)
				f.Prepare = append(f.Prepare, ConstraintStep{Name: name, What: cmd.Name + " NOT NULL", AddLock: AccessExclusive,
					Add:      fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s NOT NULL %s NOT VALID", tbl, pgx.Identifier{name}.Sanitize(), col),
					Validate: fmt.Sprintf("ALTER TABLE %s VALIDATE CONSTRAINT %s", tbl, pgx.Identifier{name}.Sanitize())})
				f.Undo = append(f.Undo, Undo{Schema: table.Schema, Name: name, SQL: fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT IF EXISTS %s", tbl, pgx.Identifier{name}.Sanitize())})
			case cmd.GetSubtype() == pg_query.AlterTableType_AT_SetNotNull && isNew(cmd.Name):
				col := pgx.Identifier{cmd.Name}.Sanitize()
				chk := pgx.Identifier{notNullCheck(cmd.Name)}.Sanitize()
				f.NotNull = append(f.NotNull, cmd.Name)
				f.Prepare = append(f.Prepare, ConstraintStep{Name: notNullCheck(cmd.Name), What: cmd.Name + " NOT NULL", AddLock: AccessExclusive,
					Add:      fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s CHECK (%s IS NOT NULL) NOT VALID", tbl, chk, col),
					Validate: fmt.Sprintf("ALTER TABLE %s VALIDATE CONSTRAINT %s", tbl, chk)})
				attach = append(attach, fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s SET NOT NULL", tbl, col),
					fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT %s", tbl, chk))
				f.Undo = append(f.Undo, Undo{Schema: table.Schema, Name: notNullCheck(cmd.Name), SQL: fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT IF EXISTS %s", tbl, chk)})
			case cmd.GetSubtype() == pg_query.AlterTableType_AT_AddConstraint && constraintUses(cmd.Def.GetConstraint(), isNew):
				con := cmd.Def.GetConstraint()
				if con.Conname == "" {
					return nil, fmt.Errorf("%s: name the constraint (ADD CONSTRAINT <name> ...): the daemon builds it in steps and finds it again by name after a restart", s.Quote())
				}
				name := pgx.Identifier{con.Conname}.Sanitize()
				switch con.Contype {
				case pg_query.ConstrType_CONSTR_UNIQUE:
					if con.Indexname != "" {
						kept = append(kept, c) // USING INDEX: already the safe form
						continue
					}
					cols := make([]string, len(con.Keys))
					for i, k := range con.Keys {
						cols[i] = pgx.Identifier{k.GetString_().GetSval()}.Sanitize()
					}
					f.Indexes = append(f.Indexes, IndexStep{Schema: table.Schema, Name: con.Conname, Constraint: con.Conname,
						SQL: fmt.Sprintf("CREATE UNIQUE INDEX CONCURRENTLY %s ON %s (%s)", name, tbl, strings.Join(cols, ", "))})
					attach = append(attach, fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s UNIQUE USING INDEX %s", tbl, name, name))
				case pg_query.ConstrType_CONSTR_CHECK, pg_query.ConstrType_CONSTR_FOREIGN:
					add := proto.Clone(s.tree).(*pg_query.ParseResult)
					a := add.Stmts[0].Stmt.GetAlterTableStmt()
					a.Cmds = []*pg_query.Node{proto.Clone(c).(*pg_query.Node)}
					ac := a.Cmds[0].GetAlterTableCmd().Def.GetConstraint()
					ac.SkipValidation, ac.InitiallyValid = true, false
					sql, err := pg_query.Deparse(add)
					if err != nil {
						return nil, fmt.Errorf("%s: %w", s.Quote(), err)
					}
					f.Prepare = append(f.Prepare, ConstraintStep{Name: con.Conname, Add: sql, What: "constraint " + con.Conname, AddLock: alterLock(cmd),
						Validate: fmt.Sprintf("ALTER TABLE %s VALIDATE CONSTRAINT %s", tbl, name)})
					f.Undo = append(f.Undo, Undo{Schema: table.Schema, Name: con.Conname, SQL: fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT IF EXISTS %s", tbl, name)})
				default:
					kept = append(kept, c)
				}
			default:
				kept = append(kept, c)
			}
		}
		switch {
		case len(kept) == len(at.Cmds):
			f.Contract = append(f.Contract, s.SQL)
		case len(kept) > 0:
			rest := proto.Clone(s.tree).(*pg_query.ParseResult)
			rest.Stmts[0].Stmt.GetAlterTableStmt().Cmds = kept
			sql, err := pg_query.Deparse(rest)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.Quote(), err)
			}
			f.Contract = append(f.Contract, sql)
		}
	}
	for _, ix := range f.Indexes {
		f.Undo = append(f.Undo, Undo{Index: true, Schema: ix.Schema, Name: ix.Name, SQL: "DROP INDEX CONCURRENTLY IF EXISTS " + pgx.Identifier{ix.Schema, ix.Name}.Sanitize()})
	}
	f.Attach = attach
	return f, nil
}

// indexStep is a CREATE INDEX of new columns as the daemon builds it:
// CONCURRENTLY, without IF NOT EXISTS (the build reads the catalog itself).
func indexStep(s *Statement, ix *pg_query.IndexStmt, table Relation) (IndexStep, error) {
	if ix.Idxname == "" {
		return IndexStep{}, fmt.Errorf("%s: name the index (CREATE INDEX <name> ON ...): the daemon builds it after the backfill and finds it again by name after a restart", s.Quote())
	}
	sql := s.deparse(func(n *pg_query.Node) {
		i := n.GetIndexStmt()
		i.Concurrent, i.IfNotExists = true, false
	})
	return IndexStep{Schema: table.Schema, Name: ix.Idxname, SQL: sql}, nil
}

// indexUses says whether the index's columns or expressions read a
// column isNew says yes to.
func indexUses(ix *pg_query.IndexStmt, isNew func(string) bool) bool {
	for _, p := range ix.IndexParams {
		e := p.GetIndexElem()
		if e == nil {
			continue
		}
		if e.Name != "" && isNew(e.Name) {
			return true
		}
		if e.Expr != nil && readsNew(e.Expr, isNew) {
			return true
		}
	}
	return ix.WhereClause != nil && readsNew(ix.WhereClause, isNew)
}

// constraintUses says whether a constraint is on a new column.
func constraintUses(con *pg_query.Constraint, isNew func(string) bool) bool {
	if con == nil {
		return false
	}
	for _, k := range append(slices.Clone(con.Keys), con.FkAttrs...) {
		if isNew(k.GetString_().GetSval()) {
			return true
		}
	}
	return con.RawExpr != nil && readsNew(con.RawExpr, isNew)
}

// readsNew says whether an expression names a new column.
func readsNew(n *pg_query.Node, isNew func(string) bool) bool {
	found := false
	walk(n.ProtoReflect(), func(m protoreflect.Message) {
		if cr, ok := m.Interface().(*pg_query.ColumnRef); ok && len(cr.Fields) > 0 {
			if name := cr.Fields[len(cr.Fields)-1].GetString_().GetSval(); isNew(name) {
				found = true
			}
		}
	})
	return found
}
