// Package pgserver starts a real PostgreSQL 15+ with wal_level=logical, for
// the demo and, through internal/pgtest, for the tests: it finds the server
// binaries installed on this machine and runs the server from a fresh
// temporary directory.
//
// It keeps one promise: a server it started is stopped, and its directory
// removed, by Stop; if the calling process dies first the kernel sends the
// server SIGQUIT (immediate shutdown), so nothing keeps running.
//
// Options.BinDir names the binaries; else Options.Version picks among those
// installed (PATH, /usr/lib/postgresql/*/bin, ...), the highest by default.
//
// The package has no testing dependency and does not link a container
// engine's client: it ships in the daemon's binary for `cdcbackfill demo`.
// Containers are a test matter (internal/pgtest attaches one with Attach).
package pgserver
