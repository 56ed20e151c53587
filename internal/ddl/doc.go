// Package ddl reads the statements the daemon runs (expand, contract,
// rollback) with PostgreSQL's own parser (libpg_query, PostgreSQL 17's),
// says what each does to the table (the columns it adds and drops, the lock
// it takes on each relation, whether it rewrites or scans the table), judges
// it against the rules of safe DDL, and runs it.
//
// The invariant it keeps: a statement that would hold a lock blocking the
// application for a time that grows with the table (a rewrite, a scan under
// a blocking lock, an index built or dropped without CONCURRENTLY) is
// refused, with its safe form, unless the operator allowed it explicitly;
// and every statement it runs waits at most lock_timeout for its lock.
//
// The parse tree decides what it can; what only the server knows (is this
// default volatile, is this type change binary-coercible, is there a
// validated check for this NOT NULL) is asked of the server by running the
// statement on a temporary copy of the table (TryOnCopy), which never locks
// the real table beyond ACCESS SHARE.
package ddl
