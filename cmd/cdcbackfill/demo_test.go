package main

import (
	"context"
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// TestDemo runs `demo` as a user would on a fresh machine: it starts a
// PostgreSQL of its own (not the tests' shared one), carries the migration
// to done under the application's load, reports parity, and leaves no
// server and no data directory behind.
func TestDemo(t *testing.T) {
	r := cli(t, 3*time.Minute, nil, "demo", "--rows", "20000")
	if r.code != 0 {
		t.Fatalf("demo failed\n%s", r)
	}
	mustContain(t, r,
		"users: 20000 rows",
		"backfill", "sync", "verify", "contract",
		"done      nothing left behind",
		"deploys release 2", "deploys release 3",
		"summary:", "phase times:", "stream corrections:", "peak slot lag:",
		"lock wait, expand DDL:", "contract cut-over:", "longest application stall",
		"application transactions:", "failed 0",
		"parity: OK (")
	if strings.Contains(r.stdout, "\r") {
		t.Errorf("output to a pipe redraws lines in place\n%s", r)
	}

	// The demo's own server is gone: its data directory and its port.
	where := regexp.MustCompile(`running at (\S+) \(data directory (\S+)\)`).FindStringSubmatch(r.stdout)
	if where == nil {
		t.Fatalf("demo does not say where its server runs\n%s", r)
	}
	dsn, dataDir := where[1], where[2]
	if _, err := os.Stat(dataDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the demo's data directory %s is still there (stat: %v)", dataDir, err)
	}
	mustContain(t, r, "PostgreSQL stopped; data directory "+dataDir+" removed")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if conn, err := pgx.Connect(ctx, dsn); err == nil {
		conn.Close(ctx)
		t.Errorf("the demo's server at %s still accepts connections", dsn)
	}
}

func TestDemoRejectsBadRows(t *testing.T) {
	r := cli(t, 10*time.Second, nil, "demo", "--rows", "0")
	if r.code == 0 {
		t.Fatalf("demo --rows 0 should fail\n%s", r)
	}
	mustContain(t, r, "--rows must be at least 1")
}
