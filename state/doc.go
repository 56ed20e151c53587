// Package state is the store of a migration's persisted state: one row of
// cdcbackfill.migrations per name, the append-only event log
// cdcbackfill.events, the keys the backfill must retry
// (cdcbackfill.retry_keys) and the rows out of parity while the application
// owns the new columns (cdcbackfill.mismatches).
//
// Invariant: every change of state a crash must not lose is one named
// operation, written in one statement or in the caller's transaction (a
// batch's cursor with the batch, a DDL statement's count with the
// statement), so a restarted daemon resumes exactly where the state says.
//
// Callers say what happens to a migration (Move, RecordBatch, HandOver,
// RequestAbort, ...); only this package knows the columns.
package state
