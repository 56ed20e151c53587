// Package pgtest gives tests a real PostgreSQL 15+ server running with
// wal_level=logical: one per test binary, shared by its tests, each of which
// takes a fresh database.
//
// Start picks the first source that works:
//
//  1. the server named by the CDCBACKFILL_TEST_DSN environment variable
//     (a superuser DSN; Restart is not supported there);
//  2. a postgres:<version>-alpine container through testcontainers-go, when
//     a Docker engine answers and CDCBACKFILL_PG_BINDIR is not set;
//  3. a server of internal/pgserver: the binaries installed on this machine,
//     or those it installs or fetches once, run from a temporary directory.
//
// CDCBACKFILL_PG_VERSION picks the major version for 2 and 3 (default: the
// container's postgres:16, or the highest installed, else
// pgserver.DefaultVersion); CDCBACKFILL_PG_BINDIR the binaries for 3.
// Server.Major tells what a test runs on.
//
// Containers live here rather than in internal/pgserver so that the daemon's
// binary, which links pgserver for its demo, does not link a container
// engine's client.
//
// Test binaries call Main from TestMain, then Shared and NewDatabase from
// their tests.
package pgtest
