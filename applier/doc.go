// Package applier turns the keys the replication stream reports as changed
// into recompute statements, and says how far the slot may be confirmed.
//
// Invariant: a key's new columns equal their expressions once the commit that
// changed it is confirmed.
//
// How it keeps it:
//   - A Change only says "key k changed in the transaction committed at
//     FinalLSN". Keys are coalesced in a buffer of at most MaxBatchKeys, each
//     with the FinalLSN of the earliest transaction that put it there, and
//     flushed by one recompute.Table.Keys statement: the new columns are
//     recomputed from the row as it is now, which is at or after that change.
//   - "The row as it is now" needs the change to be visible: the walsender
//     sends a transaction once its commit record is flushed, possibly before
//     the committing backend leaves the proc array (for the whole wait for a
//     synchronous standby), and a snapshot taken then still sees the old row
//     (an inserted row not at all). So the applier keeps the xids (Event.Xid)
//     of the transactions that put keys in the buffer, at most MaxBatchKeys of
//     them, and before each flush polls a new snapshot on its own connection
//     until none of them is running; only then do the recompute statements
//     run, and their later snapshots see every one of those transactions.
//   - Keys another transaction holds come back skipped and stay in the buffer
//     with their FinalLSN, to be retried; they hold the confirmed position.
//   - The confirmed position is the end of the last Commit (or Idle position)
//     when nothing is pending, else the smallest FinalLSN pending (buffered
//     keys and the transaction in flight). Confirming a commit's start LSN
//     makes the server send that transaction again, so a crash or restart
//     replays from there and never skips an unapplied key.
//   - The buffer is flushed when full even in the middle of a transaction (the
//     transaction is committed: protocol 1 sends it at commit), and input is
//     not read while it is full, so memory stays bounded whatever a
//     transaction's size.
//
// The applier owns the write connection it is given and never retries an
// error: a failed statement (a lost connection as much as an expression that
// fails on a row) ends Run, and the conductor restarts the pipeline, which
// replays from the confirmed position.
package applier
