// Package snapshot starts the migration's view of the table and fills the
// new columns: it creates the publication and the logical slot with an
// exported snapshot, reads the backfill plan (key bounds, row estimate) in
// that snapshot and releases it at once, then walks the key range in
// throttled keyset batches.
//
// Invariant: when the backfill has passed the planned highest key, every
// row that existed at the slot's consistent point and has not changed since
// is in parity (rows changed since are the stream's job); a batch's cursor
// is saved in the same transaction as the batch, so a crash repeats at most
// the batch in hand and never skips one.
package snapshot
