package preflight

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
)

// checkDDL reads every expand, contract and rollback statement with
// PostgreSQL's parser, says for each the lock it takes and whether it
// rewrites or scans the table (asking the server on a copy of the table
// where the tree cannot tell), and refuses what the rules of internal/ddl
// refuse, unless ddl.allow or the statement's comment allows it.
func checkDDL(ctx context.Context, in *inspection) (bool, error) {
	r, cfg := in.r, in.cfg
	allow, ok := allowedRules(r, cfg.DDL.Allow)
	if !ok {
		return false, nil
	}
	lists := []ddlList{{ddl.Expand, cfg.Expand}, {ddl.Contract, cfg.Contract}, {ddl.Rollback, cfg.Rollback}}
	parsed := parseLists(r, lists)
	if !slices.Contains(parsed[ddl.Expand], nil) && !slices.Contains(parsed[ddl.Contract], nil) {
		// What the new columns become is the daemon's to run in steps; the
		// rules judge what then runs as written.
		planned, err := planLists(ctx, in, lists, parsed)
		if err != nil || !planned {
			return false, err
		}
	}
	return false, judgeLists(ctx, in, lists, parsed, allow)
}

// ddlList is one of the config's statement lists, as plan judges it.
type ddlList struct {
	list  ddl.List
	stmts []string
}

// parseLists parses every statement of the lists, failing each that does
// not parse (its place then holds nil).
func parseLists(r *Report, lists []ddlList) map[ddl.List][]*ddl.Statement {
	parsed := map[ddl.List][]*ddl.Statement{}
	for _, l := range lists {
		for i, sql := range l.stmts {
			s, err := ddl.Parse(sql)
			if err != nil {
				r.fail(fmt.Sprintf("%s[%d]", l.list, i), err.Error(), "write one statement per list entry, in syntax that PostgreSQL "+strings.TrimPrefix(ddl.ParserVersion, "PostgreSQL ")+" knows")
				s = nil
			}
			parsed[l.list] = append(parsed[l.list], s)
		}
	}
	return parsed
}

// planLists replaces the expand and contract lists by what runs (ddl.PlanFor)
// and reports the steps the new columns take. planned is false when the
// plan failed (reported): nothing more is judged.
func planLists(ctx context.Context, in *inspection, lists []ddlList, parsed map[ddl.List][]*ddl.Statement) (planned bool, err error) {
	v, err := pgfeature.ServerVersion(ctx, in.conn)
	if err != nil {
		return false, err
	}
	f, err := ddl.PlanFor(in.cfg, v)
	if err != nil {
		in.r.fail("new columns", err.Error(), "")
		return false, nil
	}
	reportFinish(in.r, f)
	lists[0].stmts, lists[1].stmts = f.Expand, f.Contract
	parsed[ddl.Expand], parsed[ddl.Contract] = nil, nil
	for _, l := range lists[:2] {
		for _, sql := range l.stmts {
			s, err := ddl.Parse(sql)
			if err != nil {
				return false, fmt.Errorf("%s: %w", l.list, err) // the parser's own output: a bug
			}
			parsed[l.list] = append(parsed[l.list], s)
		}
	}
	return true, nil
}

// judgeLists tries each list on a copy of the table where the server lets
// plan make one, and judges every statement that parsed.
func judgeLists(ctx context.Context, in *inspection, lists []ddlList, parsed map[ddl.List][]*ddl.Statement, allow []ddl.Rule) error {
	r, t := in.r, in.table
	rel := relations{ctx: ctx, conn: in.conn, schema: t.Schema, name: t.Name}
	if err := in.conn.QueryRow(ctx, "SELECT $1::regclass::oid", t.Ident()).Scan(&rel.oid); err != nil {
		return fmt.Errorf("read the table's oid: %w", err)
	}
	for _, l := range lists {
		stmts := compact(parsed[l.list])
		var setup []*ddl.Statement
		if l.list != ddl.Expand {
			setup = compact(parsed[ddl.Expand])
		}
		tried, err := ddl.TryOnCopy(ctx, in.conn, t.Schema, t.Name, setup, stmts)
		untried := ""
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			untried = "no temporary copy of the table could be made: " + err.Error()
			r.info(string(l.list)+" statements", "judged from the parse tree alone: "+untried,
				"GRANT TEMPORARY ON DATABASE to the role, and SELECT on the table, so plan can ask the server")
			tried = make([]*ddl.Tried, len(stmts))
		}
		j := 0
		for i, s := range parsed[l.list] {
			if s == nil {
				continue
			}
			judgeStatement(r, l.list, i, s, tried[j], untried, allow, rel)
			j++
		}
	}
	return nil
}

func judgeStatement(r *Report, list ddl.List, i int, s *ddl.Statement, tried *ddl.Tried, untried string, allow []ddl.Rule, rel relations) {
	name := fmt.Sprintf("%s[%d]", list, i)
	r.ok(fmt.Sprintf("%s %s: %s", name, s.Kind, describeStatement(s, tried, rel)))
	for _, f := range ddl.Judge(s, ddl.Context{List: list, Index: i, IsTable: rel.isTable, Exists: rel.exists, Tried: tried, Untried: untried, Allow: allow}) {
		switch {
		case f.Refused && f.Rule == "":
			r.fail(name, f.Problem, f.SafeForm)
		case f.Refused:
			r.fail(name, f.Problem+fmt.Sprintf(" (rule %s)", f.Rule),
				fmt.Sprintf("%s; or, knowing what it costs, allow it: ddl.allow: [%s], or the comment -- cdcbackfill:allow %s before the statement", f.SafeForm, f.Rule, f.Rule))
		case f.AllowedBy != "":
			r.warn(name, f.Problem+" (allowed by "+f.AllowedBy+")", "")
			r.Allowed = append(r.Allowed, name+": "+f.Problem+" (allowed by "+f.AllowedBy+")")
		default:
			r.info(name, f.Problem, "")
		}
	}
}

// describeStatement is what plan prints of a statement: the lock it takes
// on each relation and what it does to the table.
func describeStatement(s *ddl.Statement, tried *ddl.Tried, rel relations) string {
	var parts []string
	for _, l := range s.Locks {
		mode := l.Mode
		if tried != nil && tried.Err == nil && rel.isTable(l.Relation) && tried.Lock != ddl.NoLock {
			mode = tried.Lock // the server's own word
		}
		does := ""
		if rel.isTable(l.Relation) {
			rewrites, scans := s.Does(l.Relation, tried)
			does = ", no rewrite, no scan"
			switch {
			case rewrites:
				does = ", rewrites the table"
			case scans:
				does = ", scans the table"
			}
		}
		parts = append(parts, fmt.Sprintf("%s on %s (%s%s)", mode, l.Relation, mode.Blocks(), does))
	}
	if len(parts) == 0 {
		parts = append(parts, "takes no lock on a table")
	}
	out := strings.Join(parts, "; ")
	if tried != nil && tried.Err == nil {
		out += "; tried on a copy of the table"
	}
	if !s.InTransaction {
		out += "; runs outside a transaction block"
	}
	return out
}

// allowedRules reads ddl.allow.
func allowedRules(r *Report, names []string) ([]ddl.Rule, bool) {
	var out []ddl.Rule
	for _, n := range names {
		rule := ddl.Rule(strings.TrimSpace(n))
		if !slices.Contains(ddl.Rules, rule) {
			r.fail("ddl.allow", fmt.Sprintf("%q is no rule", n), "list some of: "+ddl.RuleNames())
			return nil, false
		}
		out = append(out, rule)
	}
	return out, true
}

func compact(stmts []*ddl.Statement) []*ddl.Statement {
	return slices.DeleteFunc(slices.Clone(stmts), func(s *ddl.Statement) bool { return s == nil })
}

// relations answers, from the server, which relation a statement names:
// the migrated table (by search path, as the server will resolve it), one
// of its indexes, another existing relation, or one not there yet.
type relations struct {
	ctx          context.Context
	conn         *pgx.Conn
	schema, name string
	oid          uint32
}

// isTable: an index counts as the table's when it is one of the table's,
// or when it does not exist yet (an index the lists create is on the
// table, as far as plan can tell).
func (r relations) isTable(rel ddl.Relation) bool {
	var oid *uint32
	var err error
	if rel.Index {
		err = r.conn.QueryRow(r.ctx, "SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = to_regclass($1)", rel.String()).Scan(&oid)
		if errors.Is(err, pgx.ErrNoRows) {
			return true
		}
	} else {
		err = r.conn.QueryRow(r.ctx, "SELECT to_regclass($1)::oid", rel.String()).Scan(&oid)
	}
	switch {
	case err != nil:
		return rel.Is(r.schema, r.name) // the server could not say: as written
	case oid == nil:
		return false // not there yet: created by an earlier statement
	}
	return *oid == r.oid
}

func (r relations) exists(rel ddl.Relation) bool {
	var ok bool
	if err := r.conn.QueryRow(r.ctx, "SELECT to_regclass($1) IS NOT NULL", rel.String()).Scan(&ok); err != nil {
		return true
	}
	return ok
}

// reportFinish says, for what the new columns become, each step in the
// phase where it runs and the lock it takes.
func reportFinish(r *Report, f *ddl.Finish) {
	for _, ix := range f.Indexes {
		r.ok(fmt.Sprintf("once verify starts (after the backfill): %s (SHARE UPDATE EXCLUSIVE: blocks neither reads nor writes; throttled like a batch; its waits for older snapshots bounded by ddl.concurrent_timeout)", ix.SQL))
	}
	for _, c := range f.Prepare {
		r.ok(fmt.Sprintf("after the hand-over, before the cut-over: %s (%s, for a moment: no scan; under ddl.lock_timeout, retried), then %s (SHARE UPDATE EXCLUSIVE: reads the table, blocks neither reads nor writes)",
			c.Add, c.AddLock, c.Validate))
	}
	for _, a := range f.Attach {
		r.ok(fmt.Sprintf("in the cut-over, after the contract statements: %s (no scan: it uses what was built and validated before)", a))
	}
}
