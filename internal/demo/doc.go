// Package demo tells the running example of DESIGN.md end to end, on a
// PostgreSQL it starts itself: users.full_name is split into first_name and
// last_name while an application keeps writing, and the daemon carries the
// table from expand to done.
//
// It keeps two promises. The server it starts is stopped (and its files
// removed) before Run returns, whatever happened: done, failure or Ctrl-C.
// The parity it reports is not the daemon's word: the application records
// what it wrote for each row in its own table, in the same transaction, and
// one SQL join compares that with the migrated table at the end.
//
// The files follow the story: the application is internal/workload's (three
// releases: full_name only, dual-write, new columns only; the tests and the
// benchmarks run the same one), progress.go is what the person at the
// terminal sees while it runs, summary.go is the account at the end, and
// demo.go is the conductor that ties them to the daemon.
package demo
