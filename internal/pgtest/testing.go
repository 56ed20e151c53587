package pgtest

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"
)

// shared is the server started by Main.
var shared *Server

// Main is called from TestMain: it starts one server for the whole test
// binary, runs m, stops the server (also on SIGINT or SIGTERM) and exits
// with the code of m.Run. If no server can be started, it prints why and
// exits with code 1.
func Main(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	srv, err := StartWithLog(ctx, os.Stderr)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgtest:", err)
		return 1
	}
	shared = srv
	defer func() {
		if err := srv.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest:", err)
		}
	}()

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		sig := <-sigs
		fmt.Fprintf(os.Stderr, "pgtest: %v, stopping the server\n", sig)
		if err := srv.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest:", err)
		}
		os.Exit(1)
	}()

	return m.Run()
}

// Shared returns the server started by Main.
func Shared(t testing.TB) *Server {
	t.Helper()
	if shared == nil {
		t.Fatal("pgtest: no server; call pgtest.Main(m) from TestMain")
	}
	return shared
}

// NewDatabase creates a fresh database on the shared server, named after
// the test, drops it when the test ends and returns its superuser DSN.
func NewDatabase(t testing.TB) string {
	t.Helper()
	srv := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name, dsn, err := srv.CreateDatabase(ctx, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := srv.DropDatabase(ctx, name); err != nil {
			t.Error(err)
		}
	})
	return dsn
}
