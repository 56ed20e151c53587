package preflight

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/cdcbackfill/cdcbackfill/internal/exprcheck"
)

// checkExpressions proves each expression is one expression of the row
// (exprcheck, PostgreSQL's parser), lets PostgreSQL check it over the row
// by preparing a query, then asks the server whether it is immutable: a
// volatile one is refused (it never reaches parity), a stable one warned
// (it depends on the session's settings or time).
func checkExpressions(ctx context.Context, in *inspection) (bool, error) {
	r, conn, t := in.r, in.conn, in.table
	allValid := true
	parsed := map[string]*exprcheck.Expr{}
	for _, c := range t.Columns {
		name := "expression for " + c.Name
		e, err := exprcheck.Parse(c.Expr)
		if err != nil {
			fix := "write a single SQL expression over the row, e.g. split_part(full_name, ' ', 1)"
			if errors.Is(err, exprcheck.ErrSubquery) {
				fix = "use only the row's own columns; a value from another table belongs in the application's writes"
			}
			r.fail(name, fmt.Sprintf("columns.%s: %v", c.Name, err), fix)
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
		parsed[c.Name] = e
	}
	if len(parsed) > 0 {
		ok, err := checkVolatility(ctx, in, parsed)
		if err != nil {
			return false, err
		}
		allValid = allValid && ok
	}
	if allValid && len(t.MissingColumns()) == 0 {
		// Every target exists: prepare the real statements, which also
		// checks that each expression's type fits its column.
		for _, sql := range []string{t.RangeSQL(true), t.KeysSQL()} {
			if _, err := conn.Prepare(ctx, "", sql); err != nil {
				r.fail("recompute statement", err.Error(), "make each expression's type assignable to its column")
				return false, nil
			}
		}
		r.ok("recompute statement prepares")
	}
	return false, nil
}

// checkVolatility reports each parsed expression's verdict, in the
// columns' order; false when one is refused.
func checkVolatility(ctx context.Context, in *inspection, parsed map[string]*exprcheck.Expr) (bool, error) {
	r, t := in.r, in.table
	probe, err := exprcheck.OpenProbe(ctx, in.conn, t.Schema, t.Name)
	if err != nil {
		r.fail("expressions' volatility", err.Error(), "the check needs a temporary table: GRANT TEMPORARY ON DATABASE to the role")
		return false, nil
	}
	defer probe.Close()
	if r.Settings, err = probe.Settings(ctx); err != nil {
		return false, err
	}
	allOK := true
	for _, c := range t.Columns {
		e := parsed[c.Name]
		if e == nil {
			continue
		}
		name := "expression for " + c.Name
		v, err := probe.Check(ctx, e)
		var notOfRow *exprcheck.NotOfRowError
		switch {
		case errors.As(err, &notOfRow):
			r.fail(name, fmt.Sprintf("columns.%s: %v", c.Name, err), "write an expression of one row: no aggregate, window or set-returning function")
			allOK = false
			continue
		case err != nil:
			return false, fmt.Errorf("check expression for %s: %w", c.Name, err)
		}
		for _, f := range v.Volatile {
			r.fail(name, fmt.Sprintf("columns.%s calls %s: its value changes at every evaluation, so the column never reaches parity", c.Name, called(f)),
				"compute the value in the application, or use an immutable expression")
			allOK = false
		}
		for _, f := range v.Stable {
			r.warn("stable expression "+c.Name, describe(f), stableFix(f))
		}
		if v.Immutable() {
			r.ok(name + " is valid SQL over the row, immutable")
		} else if len(v.Volatile) == 0 {
			r.ok(name + " is valid SQL over the row")
		}
	}
	return allOK, nil
}

// describe: "created_at::text: timestamptz output depends on TimeZone,
// DateStyle (the daemon evaluates with TimeZone=UTC, DateStyle=ISO, MDY)".
func describe(f exprcheck.Finding) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s", f.Call, f.What)
	if len(f.Settings) > 0 {
		fmt.Fprintf(&b, " depends on %s", strings.Join(f.Settings, ", "))
	}
	if f.Note != "" {
		fmt.Fprintf(&b, " (%s)", f.Note)
	}
	if len(f.Values) > 0 {
		vals := make([]string, len(f.Settings))
		for i, n := range f.Settings {
			vals[i] = n + "=" + f.Values[n]
		}
		fmt.Fprintf(&b, " (the daemon evaluates with %s: the database's and role's defaults; the application's session may differ)", strings.Join(vals, ", "))
	}
	return b.String()
}

// called is what a refusal names: "volatile function random", and the call
// when it says more ("volatile operator ## (x ## y)").
func called(f exprcheck.Finding) string {
	words := strings.Fields(f.What)
	if len(words) > 0 && strings.HasPrefix(f.Call, words[len(words)-1]+"(") {
		return f.What
	}
	return f.What + " (" + f.Call + ")"
}

func stableFix(f exprcheck.Finding) string {
	if f.Fix != "" {
		return f.Fix
	}
	return "harmless when the daemon's settings are the application's; an immutable expression reaches parity whatever they are"
}
