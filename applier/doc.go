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
//     them. Each recompute statement reports the snapshot it ran with; where
//     one of those transactions was still running in it, the statement runs
//     again once none is. After the hand-over the check statements report no
//     snapshot, so a flush polls one on its own connection first.
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
//   - The publication holds only the migrated table (its partitions publish
//     as the root), so a Change of any other relation means the publication
//     or the table changed under the daemon. Run stops with
//     ErrForeignRelation, naming the relation, with that transaction in
//     flight: ignoring it would confirm past changes the daemon never saw
//     for its table.
//
// The applier owns the write connection it is given and never retries an
// error: a failed statement (a lost connection as much as an expression that
// fails on a row) ends Run, and the conductor restarts the pipeline, which
// replays from the confirmed position.
//
// Stopping (SIGTERM) finishes the batch in hand. When Run's context ends it
// reads no more events, lets the statement in hand finish, flushes the
// buffer once more and returns nil, ConfirmedLSN then covering every key
// applied. Its statements run on a context of their own that ends
// Config.StopTimeout (10s) after Run's does, which bounds the stop; keys not
// applied by then hold the confirmed position and replay. The stream reads
// ConfirmedLSN for its standby status, so the conductor stops the two in
// this order, with a context each:
//
//  1. cancel the applier's context;
//  2. wait until Applier.Run has returned (ConfirmedLSN is final);
//  3. cancel the stream's context and wait for cdc.Stream.Run, whose last
//     standby status carries that final position; then close the events
//     channel.
//
// Cancelling both at once races: the stream may send its last status before
// the applier's last flush raises the position, and the slot restarts
// further back than it needs to (safe, but the work replays). When the
// stream fails first, closing the events channel after its Run returns ends
// Applier.Run the same way, with a last flush.
package applier
