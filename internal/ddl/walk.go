package ddl

import (
	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// rangeVars calls fn for every RangeVar in the tree under m: every table a
// statement names, wherever in the tree it stands.
func rangeVars(m proto.Message, fn func(*pg_query.RangeVar)) {
	walk(m.ProtoReflect(), func(msg protoreflect.Message) {
		if rv, ok := msg.Interface().(*pg_query.RangeVar); ok {
			fn(rv)
		}
	})
}

func walk(m protoreflect.Message, fn func(protoreflect.Message)) {
	if !m.IsValid() {
		return
	}
	fn(m)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				walk(l.Get(i).Message(), fn)
			}
		case fd.Message() != nil && !fd.IsMap():
			walk(v.Message(), fn)
		}
		return true
	})
}

// deparse is the SQL of a statement's tree after change edited a copy of
// it: the safe forms are the user's own statement with one thing changed.
func (s *Statement) deparse(change func(stmt *pg_query.Node)) string {
	tree := proto.Clone(s.tree).(*pg_query.ParseResult)
	change(tree.Stmts[0].Stmt)
	out, err := pg_query.Deparse(tree)
	if err != nil {
		return s.SQL
	}
	return out
}
