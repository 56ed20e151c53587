// Package pgtest gives tests, and the demo command, a real PostgreSQL 15+
// server running with wal_level=logical.
//
// Start picks the first source that works:
//
//  1. the server named by the CDCBACKFILL_TEST_DSN environment variable
//     (a superuser DSN; Restart is not supported there);
//  2. a postgres:16-alpine container through testcontainers-go, when a
//     Docker engine answers;
//  3. the server binaries installed on this machine (initdb and postgres on
//     PATH or under /usr/lib/postgresql/*/bin), run from a fresh temporary
//     directory named cdcbackfill-pgtest-*.
//
// A local server runs as a child of the calling process and receives SIGQUIT
// (immediate shutdown) if that process dies, so a panicking or killed test
// binary does not leave a postgres running.
//
// Test binaries call Main from TestMain, then Shared and NewDatabase from
// their tests.
package pgtest
