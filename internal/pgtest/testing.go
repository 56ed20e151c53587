package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"

	"github.com/cdcbackfill/cdcbackfill/internal/pgserver"
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

// Standby is a physical standby of the shared server; see
// pgserver.Standby.
type Standby = pgserver.Standby

// StartStandby makes a physical standby of the shared server streaming
// through a new physical slot named slot (pg_basebackup -R -C -S), and
// removes it, slot and all, when the test ends. It skips the test where
// the shared server is not run from local binaries (CDCBACKFILL_TEST_DSN,
// Docker): pg_basebackup and the standby run here, beside the primary.
func StartStandby(t testing.TB, slot string) *Standby {
	t.Helper()
	srv := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sb, err := srv.StartStandby(ctx, slot)
	if errors.Is(err, pgserver.ErrStandbyUnsupported) {
		t.Skipf("needs a standby beside the test server, which is %q here, not one run from local binaries: unset %s, or set %s", srv.Kind(), EnvDSN, pgserver.EnvBinDir)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sb.Remove(); err != nil {
			t.Error(err)
		}
	})
	return sb
}
