package ddl

import (
	"fmt"

	"github.com/jackc/pgx/v5"
	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// Statement is one entry of an expand, contract or rollback list, as the
// parser reads it.
type Statement struct {
	SQL       string
	Kind      string     // "ALTER TABLE", "CREATE INDEX", "DROP INDEX"...
	Relations []Relation // every relation it names, in order, once each
	Locks     []Lock     // the strongest lock it takes on each relation
	Added     []string   // columns it adds (ALTER TABLE ... ADD COLUMN)
	Dropped   []string   // columns it drops (ALTER TABLE ... DROP COLUMN)
	Effects   []Effect   // what it does that the rules judge
	// InTransaction is false for a statement PostgreSQL refuses to run in a
	// transaction block (CONCURRENTLY, VACUUM).
	InTransaction bool
	Allow         []Rule // allowed by a leading comment "-- cdcbackfill:allow rule, ..."

	tree *pg_query.ParseResult
}

// Relation is a table or an index a statement names, schema-qualified as
// written (Schema is empty when the statement does not qualify it).
type Relation struct {
	Schema, Name string
	Index        bool // the name is an index's (DROP INDEX, REINDEX INDEX)
}

func (r Relation) String() string {
	if r.Schema == "" {
		return pgx.Identifier{r.Name}.Sanitize()
	}
	return pgx.Identifier{r.Schema, r.Name}.Sanitize()
}

// Is says whether r names the table schema.name as written: an unqualified
// name matches by name alone. The phases ask the server instead (search
// path, indexes); this is for the parse tree alone.
func (r Relation) Is(schema, name string) bool {
	return !r.Index && r.Name == name && (r.Schema == "" || r.Schema == schema)
}

func relationOf(rv *pg_query.RangeVar) Relation {
	return Relation{Schema: rv.GetSchemaname(), Name: rv.GetRelname()}
}

// LockMode is a table-level lock mode, ordered by strength as PostgreSQL
// orders them (the value is its LOCKMODE number).
type LockMode int

const (
	NoLock LockMode = iota
	AccessShare
	RowShare
	RowExclusive
	ShareUpdateExclusive
	Share
	ShareRowExclusive
	Exclusive
	AccessExclusive
	// UnknownLock: the statement names the relation where the parse tree
	// does not say which lock it takes there.
	UnknownLock LockMode = -1
)

var lockNames = []string{"no lock", "ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE",
	"SHARE", "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"}

func (m LockMode) String() string {
	if m < 0 || int(m) >= len(lockNames) {
		return "a lock the parse tree does not tell"
	}
	return lockNames[m]
}

// Blocks says what the lock keeps the application from doing while held.
func (m LockMode) Blocks() string {
	switch {
	case m == AccessExclusive:
		return "blocks reads and writes"
	case m >= Share:
		return "blocks writes"
	case m == UnknownLock:
		return "may block"
	}
	return "blocks neither reads nor writes"
}

// pgLocksModes maps pg_locks.mode to LockMode.
var pgLocksModes = map[string]LockMode{
	"AccessShareLock": AccessShare, "RowShareLock": RowShare, "RowExclusiveLock": RowExclusive,
	"ShareUpdateExclusiveLock": ShareUpdateExclusive, "ShareLock": Share,
	"ShareRowExclusiveLock": ShareRowExclusive, "ExclusiveLock": Exclusive, "AccessExclusiveLock": AccessExclusive,
}

// Lock is the strongest lock a statement takes on one relation.
type Lock struct {
	Relation Relation
	Mode     LockMode
}

// Rule names a kind of refusal; ddl.allow and the allow comment list them.
type Rule string

const (
	Rewrite       Rule = "rewrite"        // the table is written again under the lock
	Scan          Rule = "scan"           // the table is read whole under a blocking lock
	BlockingIndex Rule = "blocking_index" // an index built, dropped or rebuilt without CONCURRENTLY
	OtherRelation Rule = "other_relation" // another relation locked inside the cut-over
)

// Rules is every rule an operator can allow.
var Rules = []Rule{Rewrite, Scan, BlockingIndex, OtherRelation}

// Effect is one thing a statement does that a rule judges.
type Effect struct {
	Rule     Rule
	Relation Relation
	Reason   string // what it does and why that costs the application
	SafeForm string // what to write instead
	// Ask, when set, is the question only the server can answer: the effect
	// holds if the server's copy of the table says so (TryOnCopy).
	Ask Question
	// When says in which lists the effect matters.
	When When
}

// Question is what a statement's effect depends on that the parse tree
// cannot know.
type Question int

const (
	Known       Question = iota
	AskRewrites          // e.g. is the default volatile, is the type change binary-coercible
	AskScans             // e.g. is there a validated CHECK (c IS NOT NULL)
)

// When says where an effect costs the application.
type When int

const (
	Anywhere       When = iota
	InCutover           // only inside the cut-over, which holds ACCESS EXCLUSIVE (VALIDATE)
	OutsideCutover      // only outside it: inside, the cut-over's lock is held anyway (DROP INDEX)
)

func (s *Statement) lock(r Relation, m LockMode) {
	s.relation(r)
	for i := range s.Locks {
		if s.Locks[i].Relation == r {
			if m > s.Locks[i].Mode || s.Locks[i].Mode == UnknownLock {
				s.Locks[i].Mode = m
			}
			return
		}
	}
	s.Locks = append(s.Locks, Lock{Relation: r, Mode: m})
}

func (s *Statement) relation(r Relation) {
	for _, have := range s.Relations {
		if have == r {
			return
		}
	}
	s.Relations = append(s.Relations, r)
}

// LockOn is the lock the statement takes on r (NoLock if it names it not).
func (s *Statement) LockOn(r Relation) LockMode {
	for _, l := range s.Locks {
		if l.Relation == r {
			return l.Mode
		}
	}
	return NoLock
}

func (s *Statement) effect(e Effect) { s.Effects = append(s.Effects, e) }

// Allows says whether the statement's own comment allows rule.
func (s *Statement) Allows(rule Rule) bool {
	for _, r := range s.Allow {
		if r == rule {
			return true
		}
	}
	return false
}

// Quote is the statement as the messages show it.
func (s *Statement) Quote() string { return fmt.Sprintf("%q", s.SQL) }

// ConcurrentIndex names the index a CREATE INDEX CONCURRENTLY builds (its
// schema is the table's, "" when the statement does not qualify it): such
// a statement runs as an IndexBuild, which never takes an INVALID leftover
// for done.
func (s *Statement) ConcurrentIndex() (schema, name string, ok bool) {
	ix := s.tree.Stmts[0].Stmt.GetIndexStmt()
	if ix == nil || !ix.Concurrent || ix.Idxname == "" {
		return "", "", false
	}
	return ix.Relation.GetSchemaname(), ix.Idxname, true
}
