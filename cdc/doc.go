// Package cdc streams the published table's changes from a logical replication
// slot and tells its consumer which keys changed in which transaction.
//
// Invariant: every application change committed after the slot's consistent
// point is emitted as a Change before its Commit; nothing the consumer hasn't
// confirmed is ever confirmed to the server.
//
// How it keeps it:
//   - Run starts the slot at LSN 0, so the server resumes from the slot's
//     confirmed_flush_lsn; the only position ever sent back is the consumer's
//     confirmed(), so a crash or reconnect replays and never skips.
//   - Events go out as pgoutput messages arrive (protocol 1: a transaction is
//     sent whole at its commit), with a blocking send: the stream never
//     buffers a transaction, and a slow consumer slows the stream, not memory.
//   - Only key columns are copied out of WAL. The consumer recomputes rows from
//     their current version, so TOAST "unchanged" markers and row values in WAL
//     never matter.
//   - Every Begin, Change and Commit carries the transaction's xid: the
//     walsender may send a transaction before it is visible to snapshots
//     (its backend still in the proc array, e.g. waiting for a synchronous
//     standby), so a consumer reading rows waits for the xid first.
//   - Transactions whose Origin starts with Config.OriginPrefix (the daemon's
//     own writes) are skipped client-side, by the Origin message, because the
//     server-side origin option does not exist before PostgreSQL 16 and would
//     also drop application writes replicated in from elsewhere.
//   - A lost connection emits Reset: the consumer drops the transaction in
//     flight, which the server sends again from the confirmed position.
//   - Every standby status (each StandbyInterval, 1s by default) asks the
//     server for a reply, and the walsender answers with a keepalive carrying
//     how far it has read WAL; when no transaction is in flight it becomes an
//     Idle event. So a consumer with nothing to apply still learns within an
//     interval that WAL it gets no message for (other tables, the daemon's own
//     writes) has gone by, and a caller waiting for a position read from
//     pg_current_wal_insert_lsn() is not left waiting for the walsender's own
//     keepalive.
//
// One goroutine, the one inside Run, owns the replication connection; it also
// sends standby status while blocked on the consumer so the walsender does
// not time out.
//
// Shutdown order. The stream's last standby status must carry the
// consumer's last confirmed position, so the two are stopped in turn, not by
// one shared context:
//
//  1. cancel the consumer's context (the applier finishes the batch in hand
//     and raises its confirmed position a last time);
//  2. wait until the consumer has returned (applier.Applier.Run);
//  3. cancel the stream's context and wait for Run: it sends a last status
//     with confirmed(), now final, and returns nil.
//
// Between 1 and 3 Run may be blocked on out, which nobody reads any more: it
// keeps sending status meanwhile (the walsender does not time out) and
// returns promptly once its context ends. Run never closes out; the caller
// closes it after Run returns, which also stops a consumer still reading when
// Run fails on its own.
package cdc
