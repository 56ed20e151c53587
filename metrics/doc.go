// Package metrics is the operator's window on a running daemon: it serves
// Prometheus metrics, liveness, readiness and the status object over HTTP.
//
// It is read-only by design: pause, resume, approve and abort go through the
// migration's state row, so any host that reaches the database can steer and
// there is one source of truth; an HTTP control endpoint would be a second one
// that only works on the host running the leader.
//
// Everything it shows comes from a Source the daemon supplies, called on each
// request, so the package keeps no copy of the daemon's state.
package metrics
