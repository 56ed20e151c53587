package ddl

import (
	"fmt"
	"strings"
	"unicode"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// describe fills in what the statement is and does from its parse tree.
func describe(s *Statement, n *pg_query.Node) {
	switch {
	case n.GetAlterTableStmt() != nil:
		describeAlterTable(s, n.GetAlterTableStmt())
	case n.GetIndexStmt() != nil:
		describeCreateIndex(s, n.GetIndexStmt())
	case n.GetDropStmt() != nil:
		describeDrop(s, n.GetDropStmt())
	case n.GetReindexStmt() != nil:
		describeReindex(s, n.GetReindexStmt())
	case n.GetVacuumStmt() != nil:
		describeVacuum(s, n.GetVacuumStmt())
	case n.GetClusterStmt() != nil:
		c := n.GetClusterStmt()
		s.Kind = "CLUSTER"
		if c.Relation == nil {
			s.InTransaction = false // CLUSTER of every table
			return
		}
		r := relationOf(c.Relation)
		s.lock(r, AccessExclusive)
		s.effect(Effect{Rule: Rewrite, Relation: r, Reason: "CLUSTER writes the whole table again in index order, under ACCESS EXCLUSIVE",
			SafeForm: "leave the table's order alone during the migration (pg_repack reorders a table without the long lock)"})
	case n.GetRenameStmt() != nil:
		describeRename(s, n.GetRenameStmt())
	case n.GetCreateStmt() != nil:
		c := n.GetCreateStmt()
		s.Kind = "CREATE TABLE"
		created := relationOf(c.Relation)
		s.relation(created)
		others(s, n, created)
	case n.GetCreateTrigStmt() != nil:
		s.Kind = "CREATE TRIGGER"
		s.lock(relationOf(n.GetCreateTrigStmt().Relation), ShareRowExclusive)
	case n.GetCommentStmt() != nil:
		describeComment(s, n.GetCommentStmt())
	case n.GetLockStmt() != nil:
		s.Kind = "LOCK TABLE"
		for _, rel := range n.GetLockStmt().Relations {
			s.lock(relationOf(rel.GetRangeVar()), LockMode(n.GetLockStmt().Mode))
		}
	case n.GetTruncateStmt() != nil:
		s.Kind = "TRUNCATE"
		for _, rel := range n.GetTruncateStmt().Relations {
			s.lock(relationOf(rel.GetRangeVar()), AccessExclusive)
		}
	case n.GetCreateStatsStmt() != nil:
		s.Kind = "CREATE STATISTICS"
		others(s, n, Relation{})
		for i := range s.Locks {
			s.Locks[i].Mode = ShareUpdateExclusive
		}
	case n.GetUpdateStmt() != nil || n.GetInsertStmt() != nil || n.GetDeleteStmt() != nil || n.GetMergeStmt() != nil:
		s.Kind = kindOf(n)
		rangeVars(n, func(rv *pg_query.RangeVar) { s.lock(relationOf(rv), RowExclusive) })
	default:
		s.Kind = kindOf(n)
		others(s, n, Relation{})
	}
}

// others records every relation the tree names that no rule above placed,
// with the lock the parse tree can tell: a foreign key's referenced table
// takes SHARE ROW EXCLUSIVE; elsewhere it does not say.
func others(s *Statement, n *pg_query.Node, except Relation) {
	walk(n.ProtoReflect(), func(m protoreflect.Message) {
		switch v := m.Interface().(type) {
		case *pg_query.Constraint:
			if v.Contype == pg_query.ConstrType_CONSTR_FOREIGN && v.Pktable != nil {
				s.lock(relationOf(v.Pktable), ShareRowExclusive)
			}
		}
	})
	rangeVars(n, func(rv *pg_query.RangeVar) {
		r := relationOf(rv)
		if r != except && s.LockOn(r) == NoLock {
			s.lock(r, UnknownLock)
		}
	})
}

// kindOf names a statement the rules know nothing special of, from its
// node's name: CreateFunctionStmt is "CREATE FUNCTION".
func kindOf(n *pg_query.Node) string {
	name := string(n.ProtoReflect().WhichOneof(n.ProtoReflect().Descriptor().Oneofs().Get(0)).Message().Name())
	name = strings.TrimSuffix(name, "Stmt")
	var b strings.Builder
	for i, r := range name {
		if i > 0 && unicode.IsUpper(r) {
			b.WriteByte(' ')
		}
		b.WriteRune(unicode.ToUpper(r))
	}
	return b.String()
}

func describeCreateIndex(s *Statement, ix *pg_query.IndexStmt) {
	s.Kind = "CREATE INDEX"
	if ix.Unique {
		s.Kind = "CREATE UNIQUE INDEX"
	}
	r := relationOf(ix.Relation)
	if ix.Concurrent {
		s.InTransaction = false
		s.lock(r, ShareUpdateExclusive)
		return
	}
	s.lock(r, Share)
	s.effect(Effect{Rule: BlockingIndex, Relation: r,
		Reason:   "builds the index without CONCURRENTLY: it reads the whole table under a SHARE lock, which blocks every write for the whole build",
		SafeForm: s.deparse(func(n *pg_query.Node) { n.GetIndexStmt().Concurrent = true })})
}

func describeDrop(s *Statement, d *pg_query.DropStmt) {
	kind := strings.TrimPrefix(d.RemoveType.String(), "OBJECT_")
	kind = strings.ReplaceAll(kind, "_", " ")
	s.Kind = "DROP " + kind
	switch d.RemoveType {
	case pg_query.ObjectType_OBJECT_INDEX:
		for _, obj := range d.Objects {
			r := nameList(obj)
			r.Index = true
			if d.Concurrent {
				s.InTransaction = false
				s.lock(r, ShareUpdateExclusive)
				continue
			}
			s.lock(r, AccessExclusive)
			s.effect(Effect{Rule: BlockingIndex, Relation: r, When: OutsideCutover,
				Reason:   "drops the index without CONCURRENTLY: it takes ACCESS EXCLUSIVE on the index's table, which queues every read and write behind it",
				SafeForm: s.deparse(func(n *pg_query.Node) { n.GetDropStmt().Concurrent = true })})
		}
	case pg_query.ObjectType_OBJECT_TABLE, pg_query.ObjectType_OBJECT_VIEW, pg_query.ObjectType_OBJECT_MATVIEW,
		pg_query.ObjectType_OBJECT_SEQUENCE, pg_query.ObjectType_OBJECT_FOREIGN_TABLE:
		for _, obj := range d.Objects {
			s.lock(nameList(obj), AccessExclusive)
		}
	}
}

// nameList reads a possibly qualified name (a List of String nodes).
func nameList(n *pg_query.Node) Relation {
	var parts []string
	for _, item := range n.GetList().GetItems() {
		parts = append(parts, item.GetString_().GetSval())
	}
	switch len(parts) {
	case 0:
		return Relation{}
	case 1:
		return Relation{Name: parts[0]}
	}
	return Relation{Schema: parts[len(parts)-2], Name: parts[len(parts)-1]}
}

func describeReindex(s *Statement, rx *pg_query.ReindexStmt) {
	s.Kind = "REINDEX"
	concurrently := hasOption(rx.Params, "concurrently")
	if rx.Relation == nil {
		s.InTransaction = !concurrently && rx.Kind != pg_query.ReindexObjectType_REINDEX_OBJECT_SCHEMA &&
			rx.Kind != pg_query.ReindexObjectType_REINDEX_OBJECT_DATABASE && rx.Kind != pg_query.ReindexObjectType_REINDEX_OBJECT_SYSTEM
		return
	}
	r := relationOf(rx.Relation)
	r.Index = rx.Kind == pg_query.ReindexObjectType_REINDEX_OBJECT_INDEX
	if concurrently {
		s.InTransaction = false
		s.lock(r, ShareUpdateExclusive)
		return
	}
	// REINDEX holds SHARE on the table and ACCESS EXCLUSIVE on each index
	// it rebuilds: writes wait, and so do reads that would use the index.
	s.lock(r, Share)
	if r.Index {
		s.lock(r, AccessExclusive)
	}
	s.effect(Effect{Rule: BlockingIndex, Relation: r,
		Reason: "rebuilds without CONCURRENTLY: it blocks writes to the table, and reads that use the index, for the whole rebuild",
		SafeForm: s.deparse(func(n *pg_query.Node) {
			n.GetReindexStmt().Params = append(n.GetReindexStmt().Params, pg_query.MakeSimpleDefElemNode("concurrently", nil, 0))
		})})
}

func describeVacuum(s *Statement, v *pg_query.VacuumStmt) {
	s.Kind = "ANALYZE"
	mode := ShareUpdateExclusive
	if v.IsVacuumcmd {
		s.Kind = "VACUUM"
		s.InTransaction = false
		if hasOption(v.Options, "full") {
			s.Kind = "VACUUM FULL"
			mode = AccessExclusive
		}
	}
	for _, rel := range v.Rels {
		r := relationOf(rel.GetVacuumRelation().GetRelation())
		s.lock(r, mode)
		if mode == AccessExclusive {
			s.effect(Effect{Rule: Rewrite, Relation: r, Reason: "VACUUM FULL writes the whole table again under ACCESS EXCLUSIVE",
				SafeForm: "VACUUM (without FULL), which takes SHARE UPDATE EXCLUSIVE and blocks neither reads nor writes"})
		}
	}
}

func hasOption(opts []*pg_query.Node, name string) bool {
	for _, o := range opts {
		if d := o.GetDefElem(); d != nil && strings.EqualFold(d.Defname, name) {
			// VACUUM (FULL false) is written as an argument.
			if b := d.Arg.GetBoolean(); b != nil && !b.Boolval {
				return false
			}
			if str := d.Arg.GetString_(); str != nil && strings.EqualFold(str.Sval, "false") {
				return false
			}
			return true
		}
	}
	return false
}

func describeRename(s *Statement, rn *pg_query.RenameStmt) {
	s.Kind = "ALTER " + strings.ReplaceAll(strings.TrimPrefix(rn.RenameType.String(), "OBJECT_"), "_", " ") + " RENAME"
	if rn.Relation == nil {
		return
	}
	r := relationOf(rn.Relation)
	mode := AccessExclusive
	if rn.RenameType == pg_query.ObjectType_OBJECT_INDEX {
		r.Index = true
		mode = ShareUpdateExclusive
	}
	s.lock(r, mode)
}

func describeComment(s *Statement, c *pg_query.CommentStmt) {
	s.Kind = "COMMENT"
	switch c.Objtype {
	case pg_query.ObjectType_OBJECT_TABLE:
		s.lock(nameList(c.Object), ShareUpdateExclusive)
	case pg_query.ObjectType_OBJECT_COLUMN:
		var parts []string
		for _, item := range c.Object.GetList().GetItems() {
			parts = append(parts, item.GetString_().GetSval())
		}
		if len(parts) >= 2 {
			r := Relation{Name: parts[len(parts)-2]}
			if len(parts) >= 3 {
				r.Schema = parts[len(parts)-3]
			}
			s.lock(r, ShareUpdateExclusive)
		}
	}
}

// orNamed is a constraint's name for a message, or what stands for it.
func orNamed(name, unnamed string) string {
	if name == "" {
		return unnamed
	}
	return fmt.Sprintf("%q", name)
}
