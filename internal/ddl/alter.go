package ddl

import (
	"fmt"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// describeAlterTable reads ALTER TABLE: the statement takes the strongest
// lock of its subcommands (PostgreSQL's AlterTableGetLockLevel, 17).
func describeAlterTable(s *Statement, at *pg_query.AlterTableStmt) {
	s.Kind = "ALTER TABLE"
	r := relationOf(at.Relation)
	if at.Objtype == pg_query.ObjectType_OBJECT_INDEX {
		s.Kind = "ALTER INDEX"
		r.Index = true
	}
	s.relation(r)
	for i, c := range at.Cmds {
		cmd := c.GetAlterTableCmd()
		if cmd == nil {
			continue
		}
		s.lock(r, alterLock(cmd))
		alterEffects(s, r, i, cmd)
	}
	// What else the subcommands name (a foreign key's table, a partition).
	others(s, &pg_query.Node{Node: &pg_query.Node_AlterTableStmt{AlterTableStmt: at}}, r)
}

// alterLock is the lock one subcommand takes on the table.
func alterLock(cmd *pg_query.AlterTableCmd) LockMode {
	switch cmd.Subtype {
	case pg_query.AlterTableType_AT_EnableTrig, pg_query.AlterTableType_AT_EnableAlwaysTrig,
		pg_query.AlterTableType_AT_EnableReplicaTrig, pg_query.AlterTableType_AT_EnableTrigAll,
		pg_query.AlterTableType_AT_EnableTrigUser, pg_query.AlterTableType_AT_DisableTrig,
		pg_query.AlterTableType_AT_DisableTrigAll, pg_query.AlterTableType_AT_DisableTrigUser:
		return ShareRowExclusive
	case pg_query.AlterTableType_AT_AddConstraint:
		if con := cmd.Def.GetConstraint(); con != nil && con.Contype == pg_query.ConstrType_CONSTR_FOREIGN {
			return ShareRowExclusive
		}
		return AccessExclusive
	case pg_query.AlterTableType_AT_SetStatistics, pg_query.AlterTableType_AT_ClusterOn,
		pg_query.AlterTableType_AT_DropCluster, pg_query.AlterTableType_AT_SetOptions,
		pg_query.AlterTableType_AT_ResetOptions, pg_query.AlterTableType_AT_ValidateConstraint,
		pg_query.AlterTableType_AT_AttachPartition, pg_query.AlterTableType_AT_DetachPartitionFinalize,
		pg_query.AlterTableType_AT_SetRelOptions, pg_query.AlterTableType_AT_ResetRelOptions:
		// Storage parameters: most take SHARE UPDATE EXCLUSIVE; the server's
		// copy measures the others.
		return ShareUpdateExclusive
	case pg_query.AlterTableType_AT_DetachPartition:
		if cmd.Def.GetPartitionCmd().GetConcurrent() {
			return ShareUpdateExclusive
		}
	}
	return AccessExclusive
}

// alterEffects records the columns one subcommand adds or drops and what it
// costs the application.
func alterEffects(s *Statement, r Relation, i int, cmd *pg_query.AlterTableCmd) {
	only := func(change func(cmd *pg_query.AlterTableCmd)) string {
		return s.deparse(func(n *pg_query.Node) {
			c := n.GetAlterTableStmt().Cmds[i]
			n.GetAlterTableStmt().Cmds = []*pg_query.Node{c}
			change(c.GetAlterTableCmd())
		})
	}
	switch cmd.Subtype {
	case pg_query.AlterTableType_AT_AddColumn:
		col := cmd.Def.GetColumnDef()
		s.Added = append(s.Added, col.Colname)
		addColumnEffects(s, r, col, only)
	case pg_query.AlterTableType_AT_DropColumn:
		s.Dropped = append(s.Dropped, cmd.Name)
	case pg_query.AlterTableType_AT_AlterColumnType:
		s.effect(Effect{Rule: Rewrite, Relation: r, Ask: AskRewrites,
			Reason:   fmt.Sprintf("ALTER COLUMN %s TYPE writes the whole table again (and rebuilds its indexes) under ACCESS EXCLUSIVE unless the old type is binary-coercible to the new one (varchar to text, a longer varchar, a wider numeric)", cmd.Name),
			SafeForm: fmt.Sprintf("expand/contract the column itself: add a column of the new type in expand, backfill it with this migration (columns: %s_new: %s::<new type>), and drop the old one in contract", cmd.Name, cmd.Name)})
	case pg_query.AlterTableType_AT_SetNotNull:
		s.effect(Effect{Rule: Scan, Relation: r, Ask: AskScans,
			Reason: fmt.Sprintf("SET NOT NULL on %s reads the whole table under ACCESS EXCLUSIVE unless a validated CHECK (%s IS NOT NULL) exists", cmd.Name, cmd.Name),
			SafeForm: fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s CHECK (%s IS NOT NULL) NOT VALID; then, outside the cut-over, ALTER TABLE %s VALIDATE CONSTRAINT %s (SHARE UPDATE EXCLUSIVE: reads and writes go on); then SET NOT NULL, which uses the check instead of reading the table",
				r, quoteIdent(cmd.Name+"_not_null"), quoteIdent(cmd.Name), r, quoteIdent(cmd.Name+"_not_null"))})
	case pg_query.AlterTableType_AT_AddConstraint:
		addConstraintEffects(s, r, cmd.Def.GetConstraint(), only)
	case pg_query.AlterTableType_AT_ValidateConstraint:
		s.effect(Effect{Rule: Scan, Relation: r, When: InCutover,
			Reason:   fmt.Sprintf("VALIDATE CONSTRAINT %s reads the whole table; inside the cut-over the table's ACCESS EXCLUSIVE lock is held all that time", cmd.Name),
			SafeForm: "validate before the cut-over: run it in expand (after the constraint holds) or by hand during verify; it takes SHARE UPDATE EXCLUSIVE there, which blocks neither reads nor writes"})
	case pg_query.AlterTableType_AT_SetTableSpace:
		s.effect(Effect{Rule: Rewrite, Relation: r, Reason: "SET TABLESPACE copies the whole table under ACCESS EXCLUSIVE",
			SafeForm: "move the table outside the migration, with a tool that copies it online (pg_repack --tablespace)"})
	case pg_query.AlterTableType_AT_SetLogged, pg_query.AlterTableType_AT_SetUnLogged:
		s.effect(Effect{Rule: Rewrite, Relation: r, Reason: "SET LOGGED/UNLOGGED writes the whole table again under ACCESS EXCLUSIVE",
			SafeForm: "leave the table's persistence alone during the migration"})
	case pg_query.AlterTableType_AT_SetAccessMethod:
		s.effect(Effect{Rule: Rewrite, Relation: r, Reason: "SET ACCESS METHOD writes the whole table again under ACCESS EXCLUSIVE",
			SafeForm: "leave the table's access method alone during the migration"})
	case pg_query.AlterTableType_AT_SetExpression:
		s.effect(Effect{Rule: Rewrite, Relation: r, Reason: fmt.Sprintf("SET EXPRESSION on %s computes the column again for every row under ACCESS EXCLUSIVE", cmd.Name),
			SafeForm: "add a plain column in expand and let this migration backfill it"})
	}
}

func addColumnEffects(s *Statement, r Relation, col *pg_query.ColumnDef, only func(func(*pg_query.AlterTableCmd)) string) {
	name := col.Colname
	if def := col.RawDefault; def != nil && !isConstant(def) {
		s.effect(volatileDefault(r, name, only))
	}
	if isSerial(col.TypeName) {
		s.effect(Effect{Rule: Rewrite, Relation: r,
			Reason:   fmt.Sprintf("ADD COLUMN %s of a serial type fills every row from a sequence: the table is written again under ACCESS EXCLUSIVE", name),
			SafeForm: fmt.Sprintf("ADD COLUMN %s bigint (no default) in expand, backfill it with this migration, then set its default", name)})
	}
	for _, c := range col.Constraints {
		con := c.GetConstraint()
		switch con.GetContype() {
		case pg_query.ConstrType_CONSTR_DEFAULT:
			if !isConstant(con.RawExpr) {
				s.effect(volatileDefault(r, name, only))
			}
		case pg_query.ConstrType_CONSTR_GENERATED:
			s.effect(Effect{Rule: Rewrite, Relation: r,
				Reason:   fmt.Sprintf("ADD COLUMN %s GENERATED ... STORED computes and writes the column for every row under ACCESS EXCLUSIVE", name),
				SafeForm: fmt.Sprintf("ADD COLUMN %s <type> (a plain column) in expand, with its expression in columns: so that this migration backfills it and keeps it in sync", name)})
		case pg_query.ConstrType_CONSTR_IDENTITY:
			s.effect(Effect{Rule: Rewrite, Relation: r,
				Reason:   fmt.Sprintf("ADD COLUMN %s GENERATED ... AS IDENTITY fills every row from a sequence: the table is written again under ACCESS EXCLUSIVE", name),
				SafeForm: fmt.Sprintf("ADD COLUMN %s bigint in expand, backfill it, then ALTER COLUMN %s ADD GENERATED BY DEFAULT AS IDENTITY", name, name)})
		case pg_query.ConstrType_CONSTR_CHECK:
			s.effect(Effect{Rule: Scan, Relation: r,
				Reason:   fmt.Sprintf("ADD COLUMN %s with a CHECK reads the whole table to check it, under ACCESS EXCLUSIVE", name),
				SafeForm: fmt.Sprintf("ADD COLUMN %s without the CHECK, then ADD CONSTRAINT ... CHECK (...) NOT VALID and VALIDATE CONSTRAINT outside the cut-over", name)})
		case pg_query.ConstrType_CONSTR_PRIMARY, pg_query.ConstrType_CONSTR_UNIQUE:
			s.effect(Effect{Rule: Scan, Relation: r,
				Reason:   fmt.Sprintf("ADD COLUMN %s %s builds its index by reading the whole table under ACCESS EXCLUSIVE", name, constraintWords(con)),
				SafeForm: fmt.Sprintf("ADD COLUMN %s without it; CREATE UNIQUE INDEX CONCURRENTLY after the backfill; then ADD CONSTRAINT ... %s USING INDEX", name, constraintWords(con))})
		case pg_query.ConstrType_CONSTR_FOREIGN:
			s.effect(Effect{Rule: Scan, Relation: r,
				Reason:   fmt.Sprintf("ADD COLUMN %s REFERENCES checks every row against the referenced table under SHARE ROW EXCLUSIVE on both", name),
				SafeForm: fmt.Sprintf("ADD COLUMN %s without REFERENCES, then ADD CONSTRAINT ... FOREIGN KEY (...) REFERENCES ... NOT VALID and VALIDATE CONSTRAINT outside the cut-over", name)})
		}
	}
}

func volatileDefault(r Relation, name string, only func(func(*pg_query.AlterTableCmd)) string) Effect {
	return Effect{Rule: Rewrite, Relation: r, Ask: AskRewrites,
		Reason: fmt.Sprintf("ADD COLUMN %s with a volatile default computes it for every row: the table is written again under ACCESS EXCLUSIVE (a constant or stable default is stored once and costs nothing)", name),
		SafeForm: fmt.Sprintf("%s; then ALTER TABLE %s ALTER COLUMN %s SET DEFAULT <the default> (new rows only), and fill the old rows with this migration (columns: %s: <the expression>)",
			only(func(c *pg_query.AlterTableCmd) {
				col := c.Def.GetColumnDef()
				col.RawDefault = nil
				var kept []*pg_query.Node
				for _, n := range col.Constraints {
					if n.GetConstraint().GetContype() != pg_query.ConstrType_CONSTR_DEFAULT {
						kept = append(kept, n)
					}
				}
				col.Constraints = kept
			}), r, quoteIdent(name), name)}
}

func addConstraintEffects(s *Statement, r Relation, con *pg_query.Constraint, only func(func(*pg_query.AlterTableCmd)) string) {
	if con == nil {
		return
	}
	name := orNamed(con.Conname, "<its name>")
	switch con.Contype {
	case pg_query.ConstrType_CONSTR_CHECK:
		if !con.SkipValidation {
			s.effect(Effect{Rule: Scan, Relation: r,
				Reason: "ADD CHECK without NOT VALID reads the whole table under ACCESS EXCLUSIVE",
				SafeForm: fmt.Sprintf("%s; then, outside the cut-over, ALTER TABLE %s VALIDATE CONSTRAINT %s (SHARE UPDATE EXCLUSIVE: reads and writes go on)",
					only(func(c *pg_query.AlterTableCmd) {
						c.Def.GetConstraint().SkipValidation = true
						c.Def.GetConstraint().InitiallyValid = false
					}), r, name)})
		}
	case pg_query.ConstrType_CONSTR_FOREIGN:
		if !con.SkipValidation {
			s.effect(Effect{Rule: Scan, Relation: r,
				Reason: "ADD FOREIGN KEY without NOT VALID checks every row under SHARE ROW EXCLUSIVE on both tables, which blocks their writes",
				SafeForm: fmt.Sprintf("%s; then, outside the cut-over, ALTER TABLE %s VALIDATE CONSTRAINT %s",
					only(func(c *pg_query.AlterTableCmd) {
						c.Def.GetConstraint().SkipValidation = true
						c.Def.GetConstraint().InitiallyValid = false
					}), r, name)})
		}
	case pg_query.ConstrType_CONSTR_PRIMARY, pg_query.ConstrType_CONSTR_UNIQUE, pg_query.ConstrType_CONSTR_EXCLUSION:
		if con.Indexname == "" {
			safe := fmt.Sprintf("CREATE UNIQUE INDEX CONCURRENTLY %s ON %s (...) first (outside the cut-over), then ALTER TABLE %s ADD CONSTRAINT %s %s USING INDEX %s",
				quoteIdent(indexFor(con)), r, r, quoteIdent(indexFor(con)), constraintWords(con), quoteIdent(indexFor(con)))
			if con.Contype == pg_query.ConstrType_CONSTR_EXCLUSION {
				safe = "an exclusion constraint has no online form: build it on a table the application does not use yet"
			}
			s.effect(Effect{Rule: Scan, Relation: r,
				Reason:   fmt.Sprintf("ADD %s builds its index by reading the whole table under ACCESS EXCLUSIVE", constraintWords(con)),
				SafeForm: safe})
		}
	}
}

func constraintWords(con *pg_query.Constraint) string {
	switch con.Contype {
	case pg_query.ConstrType_CONSTR_PRIMARY:
		return "PRIMARY KEY"
	case pg_query.ConstrType_CONSTR_EXCLUSION:
		return "EXCLUDE"
	}
	return "UNIQUE"
}

func indexFor(con *pg_query.Constraint) string {
	if con.Conname != "" {
		return con.Conname
	}
	return "new_index"
}

// isConstant says whether a default is a literal (or a cast of one): it is
// then stored once in the catalog and no row is written. Anything else may
// be volatile; only the server knows.
func isConstant(n *pg_query.Node) bool {
	switch {
	case n == nil:
		return true
	case n.GetAConst() != nil:
		return true
	case n.GetTypeCast() != nil:
		return isConstant(n.GetTypeCast().Arg)
	}
	return false
}

func isSerial(t *pg_query.TypeName) bool {
	if t == nil || len(t.Names) == 0 {
		return false
	}
	switch t.Names[len(t.Names)-1].GetString_().GetSval() {
	case "serial", "bigserial", "smallserial", "serial2", "serial4", "serial8":
		return true
	}
	return false
}

func quoteIdent(name string) string { return Relation{Name: name}.String() }
