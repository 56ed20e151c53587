// Package exprcheck reads a new column's expression with PostgreSQL's own
// parser (libpg_query) and asks the server how its value can change.
//
// Invariant: an expression Parse accepts, put between parentheses where an
// expression goes, is exactly one expression of the row: it cannot close
// the parentheses, end the statement, add a clause, hide what follows in a
// comment, read another table (subquery) or take a parameter. Probe then
// tells, from the server, whether it is immutable, and if not, names each
// call that is volatile (refused: it never reaches parity) or stable
// (warned: it depends on session settings or the transaction's time).
//
// The server decides immutability (CREATE INDEX on a temporary copy of the
// table refuses what is not immutable, after inlining, exactly as it
// evaluates); the catalog (pg_proc, pg_operator, pg_cast, pg_type) says
// which of the calls it found is volatile and which is stable.
package exprcheck
