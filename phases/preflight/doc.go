// Package preflight is `plan`: it checks a migration's config against the
// database, changing nothing, and says what `run` would do. `run` checks a
// migration that has not started the same way before it creates anything.
//
// One check a file, each registered once in the ordered list of
// preflight.go; a check adds its lines (ok, FAIL, warn, info) to the Report
// and stops the checks after it only when they cannot run (no connection,
// no table). A FAIL is a problem with its fix; run refuses to start on one.
package preflight
