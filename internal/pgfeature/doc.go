// Package pgfeature asks the server what it offers the migration: its
// version, and the features behind a version or a setting, each probe once,
// read by the daemon and by plan's preflight checks alike.
//
//   - 16+: pgoutput's origin 'none' has the walsender drop the daemon's own
//     transactions instead of sending them to be skipped by the daemon
//     (OriginNone);
//   - 17+: a failover slot, kept by a standby that synchronizes slots, so
//     the daemon resumes after a promotion (FailoverSlot);
//   - 18: idle_replication_slot_timeout, which invalidates a slot no daemon
//     reads (IdleSlotTimeout);
//   - pg_stat_statements, where installed and readable, tells which
//     statements still use the old column (StatementsView).
//
// A probe only reads; none changes anything on the server.
package pgfeature
