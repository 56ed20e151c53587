package ddl

import (
	"fmt"
	"slices"
	"strings"
)

// List is where a statement stands, which decides what it may do: expand
// and rollback run each statement on its own under lock_timeout; contract
// runs inside the cut-over, in the transaction that holds the table's
// ACCESS EXCLUSIVE lock.
type List string

const (
	Expand   List = "expand"
	Contract List = "contract"
	Rollback List = "rollback"
)

// Context is what judging one statement needs beyond its tree.
type Context struct {
	List  List
	Index int // 0-based, in its list
	// IsTable says whether a relation of the statement is the migrated
	// table (for an index: one of its indexes).
	IsTable func(Relation) bool
	// Exists says whether a relation exists before the lists run; nil: all
	// do. A relation an earlier statement creates holds no application.
	Exists func(Relation) bool
	// Tried is what the server's copy of the table said, nil if it was not
	// asked; Untried says why not.
	Tried   *Tried
	Untried string
	// Allow is ddl.allow: the rules allowed for every statement.
	Allow []Rule
}

// Finding is one judgment of a statement.
type Finding struct {
	Rule     Rule // empty for a note that no rule covers
	Relation Relation
	Problem  string // names the statement and why
	SafeForm string
	// AllowedBy is how the operator allowed it ("ddl.allow", "its comment"),
	// empty when it is refused. Notes are never refused.
	AllowedBy string
	Refused   bool
}

// Judge applies the rules to one statement.
func Judge(s *Statement, c Context) []Finding {
	var out []Finding
	allow := func(f Finding) Finding {
		switch {
		case s.Allows(f.Rule):
			f.AllowedBy = "its comment " + allowPrefix + " " + string(f.Rule)
		case slices.Contains(c.Allow, f.Rule):
			f.AllowedBy = "ddl.allow"
		default:
			f.Refused = true
		}
		return f
	}
	onTable := func(r Relation) bool { return c.IsTable != nil && c.IsTable(r) }
	for _, e := range s.effects(c.Tried, c.Untried) {
		if !onTable(e.Relation) {
			continue // other relations: below
		}
		inCutover := c.List == Contract
		if e.When == InCutover && !inCutover || e.When == OutsideCutover && inCutover {
			continue
		}
		out = append(out, allow(Finding{Rule: e.Rule, Relation: e.Relation, SafeForm: e.SafeForm,
			Problem: fmt.Sprintf("%s %s: %s", s.Quote(), verb(e.Rule), e.Reason)}))
	}
	if !s.InTransaction && c.List == Contract {
		if c.Index == 0 {
			out = append(out, Finding{Refused: true,
				Problem:  fmt.Sprintf("%s cannot run in a transaction block, and the first contract statement runs inside the cut-over's", s.Quote()),
				SafeForm: "put the statement that drops the old column first; a statement that cannot run in a transaction block (CONCURRENTLY) runs after the cut-over commits, with those after it"})
		} else {
			out = append(out, Finding{
				Problem: fmt.Sprintf("%s cannot run in the cut-over's transaction block: it and the contract statements after it run after the cut-over commits", s.Quote())})
		}
	}
	var elsewhere []string
	for _, l := range s.Locks {
		if onTable(l.Relation) || c.Exists != nil && !c.Exists(l.Relation) {
			continue
		}
		elsewhere = append(elsewhere, fmt.Sprintf("%s on %s (%s)", l.Mode, l.Relation, l.Mode.Blocks()))
	}
	if len(elsewhere) > 0 {
		f := Finding{Rule: OtherRelation,
			Problem: fmt.Sprintf("%s touches a relation other than the migrated table: %s", s.Quote(), strings.Join(elsewhere, "; "))}
		if c.List == Contract {
			f.Problem += "; inside the cut-over it would hold that together with the table's ACCESS EXCLUSIVE lock, and the application waits on both"
			f.SafeForm = "run it outside the migration, or before it in expand"
			f = allow(f)
		}
		out = append(out, f)
	}
	return out
}

func verb(r Rule) string {
	switch r {
	case Rewrite:
		return "rewrites the table"
	case Scan:
		return "scans the table under a blocking lock"
	case BlockingIndex:
		return "blocks the table for an index"
	}
	return string(r)
}

// Tried is what running the statement on the server's copy of the table
// showed.
type Tried struct {
	Rewrote bool     // the copy's relfilenode changed
	Scanned bool     // a sequential scan of the copy began
	Lock    LockMode // the strongest lock it took on the copy
	Err     error    // the statement failed on the copy: the parse tree decides alone
}

// effects is the statement's effects after what the server said: an effect
// that asks the server holds if the server's copy did it; where the server
// was not asked it holds, saying so; and what the copy did that the tree
// did not foresee is added.
func (s *Statement) effects(t *Tried, untried string) []Effect {
	failed := ""
	if t != nil && t.Err != nil {
		failed = t.Err.Error()
		untried = "it failed on the server's copy of the table: " + failed
		if !t.Scanned {
			t = nil
		}
	}
	var out []Effect
	rewrote, scanned := false, false
	for _, e := range s.Effects {
		if e.Ask != Known {
			switch {
			case t != nil && failed != "":
				// It read the copy, then failed on its row: a scan is
				// shown, a rewrite is not known.
				if e.Ask == AskScans {
					e.Reason += " (the server's copy of the table shows it does; there it also fails on the table's own row: " + failed + ")"
				} else {
					e.Reason += " (the server could not tell, " + untried + "; judged from the parse tree)"
				}
			case t != nil:
				if e.Ask == AskRewrites && !t.Rewrote || e.Ask == AskScans && (!t.Scanned || t.Rewrote) {
					continue
				}
				e.Reason += " (the server's copy of the table shows it does)"
			case untried != "":
				e.Reason += " (the server could not tell, " + untried + "; judged from the parse tree)"
			}
		}
		rewrote = rewrote || e.Rule == Rewrite
		scanned = scanned || e.Rule == Scan || e.Rule == Rewrite
		out = append(out, e)
	}
	if t != nil && failed == "" && len(s.Relations) > 0 {
		r := s.Relations[0]
		switch {
		case t.Rewrote && !rewrote:
			out = append(out, Effect{Rule: Rewrite, Relation: r,
				Reason:   fmt.Sprintf("the server's copy of the table shows that it writes the whole table again, under %s", t.Lock),
				SafeForm: "split it into statements that do not rewrite (each subcommand on its own shows which one does)"})
		case t.Scanned && !scanned && t.Lock >= Share:
			out = append(out, Effect{Rule: Scan, Relation: r,
				Reason:   fmt.Sprintf("the server's copy of the table shows that it reads the whole table, under %s", t.Lock),
				SafeForm: "split it into statements that do not scan (each subcommand on its own shows which one does)"})
		}
	}
	return out
}

// Rewrites and Scans say what the statement does to a relation, after the
// server's copy where it was tried.
func (s *Statement) Does(r Relation, t *Tried) (rewrites, scans bool) {
	for _, e := range s.effects(t, "") {
		if e.Relation == r {
			rewrites = rewrites || e.Rule == Rewrite
			scans = scans || e.Rule == Scan
		}
	}
	return rewrites, scans
}
