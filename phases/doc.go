// Package phases is the conductor: it runs a migration's phases (expand,
// backfill, sync, verify, contract) from the persisted state row, calling
// the workers (snapshot, cdc, applier), which never call it; it also
// carries out the operator's commands and reads the status.
//
// Invariant: only the daemon holding the migration's leader lock acts on
// it, and every step it takes is recorded in the state row in the step's
// own transaction, so a daemon that stops anywhere resumes where it stood.
//
// Files: daemon.go (Run: look, lead, conduct), leader.go (the lock and the
// watcher), machine.go (the phase loop and the operator's flags), one file
// per phase, cutover.go, parity.go, pipeline.go, origins.go, abort.go,
// control.go, status.go; plan's checks are in phases/preflight.
package phases
