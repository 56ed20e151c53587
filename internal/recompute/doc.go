// Package recompute holds what the daemon knows of the migrated table (its
// key, the new columns and their expressions) and the one kind of statement
// that writes them: recompute the new columns from the current row, for a set
// of keys or a key range, only where they differ.
//
// Invariant: after a statement returns, every key it was given (or every key
// of the range) that exists, is not held by another transaction, is in
// parity; every key held by another transaction and out of parity is returned
// as skipped, so the caller can retry it. A key already in parity is neither
// locked nor written, so re-applying the daemon's own changes writes no WAL.
package recompute
