package exprcheck

import (
	"errors"
	"fmt"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Expr is an expression proven to be one expression of the row.
type Expr struct {
	Text  string
	node  *pg_query.Node
	calls []call // every call in the tree, parents before their children
}

// A call is a node of the tree that runs a function the server may find
// not immutable: a function call, an operator, a cast, CURRENT_TIMESTAMP.
type call struct {
	node *pg_query.Node
	end  int // calls[i+1:end] are inside this one
}

// ErrSubquery marks an expression that reads another table.
var ErrSubquery = errors.New("a subquery reads another table, whose changes are not in the stream: the expression must be of the row alone")

// prefix is what the expression is parsed after: the statements that use it
// put it between parentheses too.
const prefix = "SELECT ("

// Parse reads text as PostgreSQL does and returns an error naming the
// problem unless it is exactly one expression of the row.
func Parse(text string) (*Expr, error) {
	if strings.TrimSpace(text) == "" {
		return nil, errors.New("expression is empty")
	}
	src := prefix + text + ")"
	if err := closesLast(src); err != nil {
		return nil, err
	}
	tree, err := pg_query.Parse(src)
	if err != nil {
		return nil, fmt.Errorf("does not parse: %w", err)
	}
	node, err := onlyTarget(tree)
	if err != nil {
		return nil, err
	}
	e := &Expr{Text: text, node: node}
	if err := e.walk(node.ProtoReflect()); err != nil {
		return nil, err
	}
	return e, nil
}

// closesLast proves, with PostgreSQL's scanner, that the parenthesis opened
// before the expression is the one closed by the last token: otherwise the
// text closes it early (`a) OR (b`) or a -- comment hides the ')'.
func closesLast(src string) error {
	scan, err := pg_query.Scan(src)
	if err != nil {
		return fmt.Errorf("does not parse: %w", err)
	}
	depth, last := 0, -1
	for i, tok := range scan.Tokens {
		switch tok.Token {
		case pg_query.Token_SQL_COMMENT:
			if int(tok.End) >= len(src) {
				return fmt.Errorf("the -- comment at offset %d runs to the end and would hide what follows the expression: end it with a new line, or use /* */", int(tok.Start)-len(prefix))
			}
			continue
		case pg_query.Token_C_COMMENT:
			continue
		case pg_query.Token_ASCII_59:
			return fmt.Errorf("';' at offset %d: an expression must not end the statement", int(tok.Start)-len(prefix))
		case pg_query.Token_ASCII_40:
			depth++
		case pg_query.Token_ASCII_41:
			depth--
			if depth == 0 && i != len(scan.Tokens)-1 {
				return fmt.Errorf("')' at offset %d closes the parenthesis the expression is put in: it must be one expression", int(tok.Start)-len(prefix))
			}
		}
		last = i
	}
	if depth != 0 || last < 0 || scan.Tokens[last].Token != pg_query.Token_ASCII_41 {
		return fmt.Errorf("unbalanced '(': %d not closed", depth-1)
	}
	return nil
}

// bare is the statement of prefix+"1)" with its target taken out: an
// expression's statement must equal it once its own target is taken out.
var bare, treeVersion = func() (*pg_query.SelectStmt, int32) {
	tree, err := pg_query.Parse(prefix + "1)")
	if err != nil {
		panic(err)
	}
	s := tree.Stmts[0].Stmt.GetSelectStmt()
	s.TargetList = nil
	return s, tree.Version
}()

// onlyTarget returns the one expression of a statement that must be
// SELECT (expr) and nothing else: one statement, one unnamed target, no
// clause.
func onlyTarget(tree *pg_query.ParseResult) (*pg_query.Node, error) {
	if len(tree.Stmts) != 1 {
		return nil, fmt.Errorf("it makes %d statements: it must be one expression", len(tree.Stmts))
	}
	sel := tree.Stmts[0].Stmt.GetSelectStmt()
	if sel == nil {
		return nil, errors.New("it is not an expression")
	}
	if len(sel.TargetList) != 1 {
		return nil, fmt.Errorf("it yields %d values, want 1", len(sel.TargetList))
	}
	rest := proto.Clone(sel).(*pg_query.SelectStmt)
	rest.TargetList = nil
	if !proto.Equal(rest, bare) {
		return nil, errors.New("it adds a clause to the statement it is put in (FROM, WHERE, UNION...): it must be one expression")
	}
	target := sel.TargetList[0].GetResTarget()
	if target == nil || target.Name != "" || len(target.Indirection) != 0 || target.Val == nil {
		return nil, errors.New("it is not one expression")
	}
	return target.Val, nil
}

// walk refuses what an expression of the row cannot hold and records the
// calls, parents first.
func (e *Expr) walk(m protoreflect.Message) error {
	if n, ok := m.Interface().(*pg_query.Node); ok {
		switch n.Node.(type) {
		case *pg_query.Node_SubLink:
			return ErrSubquery
		case *pg_query.Node_ParamRef:
			return fmt.Errorf("parameter $%d: an expression is of the row alone", n.GetParamRef().Number)
		case *pg_query.Node_FuncCall, *pg_query.Node_AExpr, *pg_query.Node_TypeCast, *pg_query.Node_SqlvalueFunction:
			i := len(e.calls)
			e.calls = append(e.calls, call{node: n})
			defer func() { e.calls[i].end = len(e.calls) }()
		}
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.Message() == nil || fd.IsMap():
		case fd.IsList():
			for i := 0; i < v.List().Len() && err == nil; i++ {
				err = e.walk(v.List().Get(i).Message())
			}
		default:
			err = e.walk(v.Message())
		}
		return err == nil
	})
	return err
}

// deparse writes n back as SQL, from the tree (no comment, one expression).
func deparse(n *pg_query.Node) (string, error) {
	sel := proto.Clone(bare).(*pg_query.SelectStmt)
	sel.TargetList = []*pg_query.Node{pg_query.MakeResTargetNodeWithVal(n, 0)}
	out, err := pg_query.Deparse(&pg_query.ParseResult{Version: treeVersion, Stmts: []*pg_query.RawStmt{{Stmt: &pg_query.Node{Node: &pg_query.Node_SelectStmt{SelectStmt: sel}}}}})
	if err != nil {
		return "", fmt.Errorf("deparse: %w", err)
	}
	text, ok := strings.CutPrefix(out, "SELECT ")
	if !ok {
		return "", fmt.Errorf("deparse: unexpected %q", out)
	}
	return text, nil
}
