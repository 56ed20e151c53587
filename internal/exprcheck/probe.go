package exprcheck

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	pg_query "github.com/pganalyze/pg_query_go/v6"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// Probe asks the server about expressions over a temporary copy of a
// table's columns, in a transaction that is always rolled back. The table
// itself only gets ACCESS SHARE (from LIKE); the copy has its name, so an
// expression may name the table's columns as the statements do.
type Probe struct {
	tx   pgx.Tx
	copy string // pg_temp."table", quoted
}

// OpenProbe begins the transaction and makes the copy; Close rolls back.
func OpenProbe(ctx context.Context, conn *pgx.Conn, schema, table string) (*Probe, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("begin the expressions' check: %w", err)
	}
	p := &Probe{tx: tx, copy: pgx.Identifier{"pg_temp", table}.Sanitize()}
	if _, err := tx.Exec(ctx, "CREATE TEMPORARY TABLE "+p.copy+" (LIKE "+pgx.Identifier{schema, table}.Sanitize()+")"); err != nil {
		p.Close()
		return nil, fmt.Errorf("copy the columns of %s.%s into a temporary table to check the expressions: %w", schema, table, err)
	}
	return p, nil
}

// Close rolls back: nothing the probe made is left.
func (p *Probe) Close() { _ = p.tx.Rollback(context.Background()) }

// Verdict is what the server says of one expression: nothing when it is
// immutable.
type Verdict struct {
	Volatile []Finding // refuse: the value changes at every evaluation
	Stable   []Finding // warn: the value depends on the session or the time
}

// Immutable is true when nothing was found.
func (v Verdict) Immutable() bool { return len(v.Volatile) == 0 && len(v.Stable) == 0 }

// Finding is one call that is not immutable.
type Finding struct {
	Call     string            // the call, written back from the tree: random(), created_at::text
	What     string            // what is not immutable: "volatile function random()", "timestamptz output"
	Settings []string          // the settings it depends on, when known
	Values   map[string]string // their values in this session (the daemon's: same DSN, no SET)
	Note     string            // what else it depends on (the time)
	Fix      string            // an immutable form, when one exists
}

// NotOfRowError is an expression the server refuses over a row for another
// reason than volatility: an aggregate, a window or set-returning function.
type NotOfRowError struct{ Err error }

func (e *NotOfRowError) Error() string { return e.Err.Error() }
func (e *NotOfRowError) Unwrap() error { return e.Err }

// Check tells whether e is immutable, and if not, which of its calls are
// volatile or stable. The server decides: the smallest calls it refuses in
// an index are the findings.
func (p *Probe) Check(ctx context.Context, e *Expr) (Verdict, error) {
	var v Verdict
	mutable, err := p.mutable(ctx, e.Text)
	if err != nil {
		if dbconn.SQLState(err) == "" {
			return v, err
		}
		return v, &NotOfRowError{Err: err}
	}
	if !mutable {
		return v, nil
	}
	texts := make([]string, len(e.calls))
	flags := make([]bool, len(e.calls))
	for i, c := range e.calls {
		if texts[i], err = deparse(c.node); err != nil {
			return v, err
		}
		// A call that does not stand alone (it needs its context's types)
		// is left to the calls around it.
		if flags[i], err = p.mutable(ctx, texts[i]); err != nil && dbconn.SQLState(err) == "" {
			return v, err
		}
	}
	for i, c := range e.calls {
		if !flags[i] || inner(flags[i+1:c.end]) {
			continue
		}
		f, volatile, err := p.explain(ctx, c.node, texts[i])
		if err != nil {
			return v, err
		}
		if volatile {
			v.Volatile = append(v.Volatile, f)
		} else {
			v.Stable = append(v.Stable, f)
		}
	}
	if v.Immutable() {
		v.Stable = append(v.Stable, Finding{Call: e.Text, What: "the expression (the server finds it not immutable)"})
	}
	for _, list := range [][]Finding{v.Volatile, v.Stable} {
		for i := range list {
			if list[i].Values, err = p.values(ctx, list[i].Settings); err != nil {
				return v, err
			}
		}
	}
	return v, nil
}

func inner(flags []bool) bool {
	for _, f := range flags {
		if f {
			return true
		}
	}
	return false
}

// mutable asks the server whether text may be an index expression over the
// copy: it refuses (42P17) what is not immutable once SQL functions are
// inlined, as it evaluates it. The index is on (text) IS NULL so that any
// type will do.
func (p *Probe) mutable(ctx context.Context, text string) (bool, error) {
	if _, err := p.tx.Exec(ctx, "SAVEPOINT _cdcb_probe"); err != nil {
		return false, err
	}
	_, err := p.tx.Exec(ctx, "CREATE INDEX ON "+p.copy+" (((\n"+text+"\n) IS NULL))")
	if _, rerr := p.tx.Exec(ctx, "ROLLBACK TO SAVEPOINT _cdcb_probe"); rerr != nil {
		return false, rerr
	}
	switch {
	case err == nil:
		return false, nil
	case dbconn.SQLState(err) == pgerrcode.InvalidObjectDefinition:
		return true, nil
	default:
		return false, err
	}
}

// explain names what in call n is not immutable, from the catalog, and
// whether it is volatile.
func (p *Probe) explain(ctx context.Context, n *pg_query.Node, text string) (Finding, bool, error) {
	f := Finding{Call: text}
	switch x := n.Node.(type) {
	case *pg_query.Node_FuncCall:
		schema, name := qualified(x.FuncCall.Funcname)
		var volatile bool
		var found int
		err := p.tx.QueryRow(ctx, `SELECT coalesce(bool_or(provolatile = 'v'), false), count(*) FROM pg_proc
			WHERE proname = $1
			  AND CASE WHEN $2 = '' THEN pg_function_is_visible(oid) ELSE pronamespace = to_regnamespace($2) END
			  AND (pronargs = $3 OR provariadic <> 0 OR $3 BETWEEN pronargs - pronargdefaults AND pronargs)`,
			name, schema, len(x.FuncCall.Args)).Scan(&volatile, &found)
		if err != nil {
			return f, false, fmt.Errorf("read function %s: %w", name, err)
		}
		f.What = "stable function " + name
		if volatile {
			f.What = "volatile function " + name
		}
		f.describe(funcs[name])
		return f, volatile, nil
	case *pg_query.Node_TypeCast:
		return p.explainCast(ctx, f, x.TypeCast)
	case *pg_query.Node_AExpr:
		if x.AExpr.Kind != pg_query.A_Expr_Kind_AEXPR_OP {
			break
		}
		return p.explainOperator(ctx, f, x.AExpr)
	case *pg_query.Node_SqlvalueFunction:
		f.What = "stable " + text
		f.describe(funcs[strings.ToLower(text)])
		return f, false, nil
	}
	f.What = "stable " + text
	return f, false, nil
}

// explainCast: a cast by function is that function's; a cast through text
// (I/O coercion) is the source type's output and the target type's input.
func (p *Probe) explainCast(ctx context.Context, f Finding, c *pg_query.TypeCast) (Finding, bool, error) {
	src, err := p.typeOf(ctx, c.Arg)
	if err != nil {
		return f, false, err
	}
	dst, err := p.typeOf(ctx, &pg_query.Node{Node: &pg_query.Node_TypeCast{TypeCast: c}})
	if err != nil {
		return f, false, err
	}
	var srcName, dstName, castFunc, funcVol, outVol, inVol *string
	err = p.tx.QueryRow(ctx, `SELECT
		(SELECT typname::text FROM pg_type WHERE oid = $1), (SELECT typname::text FROM pg_type WHERE oid = $2),
		(SELECT p.proname::text FROM pg_cast c JOIN pg_proc p ON p.oid = c.castfunc WHERE c.castsource = $1 AND c.casttarget = $2),
		(SELECT p.provolatile::text FROM pg_cast c JOIN pg_proc p ON p.oid = c.castfunc WHERE c.castsource = $1 AND c.casttarget = $2),
		(SELECT p.provolatile::text FROM pg_type t JOIN pg_proc p ON p.oid = t.typoutput WHERE t.oid = $1),
		(SELECT p.provolatile::text FROM pg_type t JOIN pg_proc p ON p.oid = t.typinput WHERE t.oid = $2)`,
		src, dst).Scan(&srcName, &dstName, &castFunc, &funcVol, &outVol, &inVol)
	if err != nil {
		return f, false, fmt.Errorf("read the cast %s: %w", f.Call, err)
	}
	if castFunc != nil {
		f.What = fmt.Sprintf("cast from %s to %s by %s function %s", deref(srcName), deref(dstName), volatility(*funcVol), *castFunc)
		f.describe(funcs[*castFunc])
		return f, *funcVol == "v", nil
	}
	var parts []string
	volatile := false
	for _, side := range []struct {
		typ, vol *string
		what     string
	}{{srcName, outVol, "output"}, {dstName, inVol, "input"}} {
		if side.vol == nil || *side.vol == "i" {
			continue
		}
		parts = append(parts, deref(side.typ)+" "+side.what)
		volatile = volatile || *side.vol == "v"
		f.describe(types[deref(side.typ)])
	}
	f.What = strings.Join(parts, " and ")
	if f.What == "" {
		f.What = "cast from " + deref(srcName) + " to " + deref(dstName)
	}
	return f, volatile, nil
}

// explainOperator: the operator's function, and what a non-text operand's
// output depends on (text || anything writes the operand with it).
func (p *Probe) explainOperator(ctx context.Context, f Finding, a *pg_query.A_Expr) (Finding, bool, error) {
	_, name := qualified(a.Name)
	var volatile bool
	err := p.tx.QueryRow(ctx, `SELECT coalesce(bool_or(p.provolatile = 'v'), false) FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode
		WHERE o.oprname = $1 AND (o.oprleft = 0) = $2 AND pg_operator_is_visible(o.oid)`, name, a.Lexpr == nil).Scan(&volatile)
	if err != nil {
		return f, false, fmt.Errorf("read operator %s: %w", name, err)
	}
	f.What = "stable operator " + name
	if volatile {
		f.What = "volatile operator " + name
	}
	for _, operand := range []*pg_query.Node{a.Lexpr, a.Rexpr} {
		if operand == nil {
			continue
		}
		oid, err := p.typeOf(ctx, operand)
		if err != nil {
			return f, false, err
		}
		var typ string
		var vol string
		if err := p.tx.QueryRow(ctx, `SELECT t.typname::text, p.provolatile::text FROM pg_type t JOIN pg_proc p ON p.oid = t.typoutput WHERE t.oid = $1`, oid).Scan(&typ, &vol); err != nil {
			return f, false, fmt.Errorf("read the type of an operand of %s: %w", name, err)
		}
		if vol != "i" {
			f.What += " on " + typ + " (its output)"
			f.describe(types[typ])
		}
	}
	return f, volatile, nil
}

// typeOf is the type the server gives n over the copy's row.
func (p *Probe) typeOf(ctx context.Context, n *pg_query.Node) (uint32, error) {
	text, err := deparse(n)
	if err != nil {
		return 0, err
	}
	sd, err := p.tx.Conn().Prepare(ctx, "", "SELECT (\n"+text+"\n) FROM "+p.copy)
	if err != nil {
		return 0, fmt.Errorf("type of %s: %w", text, err)
	}
	if len(sd.Fields) != 1 {
		return 0, fmt.Errorf("type of %s: %d values", text, len(sd.Fields))
	}
	return sd.Fields[0].DataTypeOID, nil
}

// Settings is "TimeZone=UTC" and so on for every setting a stable
// expression may depend on, in this session.
func (p *Probe) Settings(ctx context.Context) ([]string, error) {
	values, err := p.values(ctx, Settings)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(Settings))
	for i, n := range Settings {
		out[i] = n + "=" + values[n]
	}
	return out, nil
}

// values reads the settings' values in this session.
func (p *Probe) values(ctx context.Context, settings []string) (map[string]string, error) {
	if len(settings) == 0 {
		return nil, nil
	}
	rows, err := p.tx.Query(ctx, `SELECT n, current_setting(n, true) FROM unnest($1::text[]) n`, settings)
	if err != nil {
		return nil, fmt.Errorf("read settings: %w", err)
	}
	values := map[string]string{}
	for rows.Next() {
		var name string
		var value *string
		if err := rows.Scan(&name, &value); err != nil {
			return nil, err
		}
		values[name] = deref(value)
	}
	return values, rows.Err()
}

func qualified(name []*pg_query.Node) (schema, fn string) {
	parts := make([]string, len(name))
	for i, n := range name {
		parts[i] = n.GetString_().GetSval()
	}
	if len(parts) == 0 {
		return "", ""
	}
	if len(parts) > 1 {
		schema = parts[len(parts)-2]
	}
	return schema, parts[len(parts)-1]
}

func volatility(v string) string {
	switch v {
	case "v":
		return "volatile"
	case "s":
		return "stable"
	}
	return "immutable"
}

func deref(s *string) string {
	if s == nil {
		return "?"
	}
	return *s
}
