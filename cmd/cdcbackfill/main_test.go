package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

// binary is the cdcbackfill built once for this test run: the tests drive
// it as a user would, and check exit codes and output.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cdcbackfill-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "cdcbackfill")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build cdcbackfill: %v\n%s", err, out)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)
	pgtest.Main(m)
}

// result of one run of the binary.
type result struct {
	code   int
	stdout string
	stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// cli runs the binary with args and a time-out, in a clean environment.
func cli(t *testing.T, timeout time.Duration, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}, env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("run %v: %v", args, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("%v did not finish in %s\n%s", args, timeout, r)
	}
	return r
}

// writeConfig writes a YAML config into the test's temp dir.
func writeConfig(t *testing.T, yaml string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "migration.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// usersConfig is the running example's config against dsn.
func usersConfig(dsn string) string {
	return fmt.Sprintf(`name: split_full_name
database:
  dsn: %s
table: public.users
expand:
  - ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text
columns:
  first_name: split_part(full_name, ' ', 1)
  last_name: split_part(full_name, ' ', 2)
contract:
  - ALTER TABLE users DROP COLUMN full_name
http:
  listen: ""
`, dsn)
}

func exec1(t *testing.T, dsn string, sqls ...string) {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	for _, sql := range sqls {
		if _, err := conn.Exec(context.Background(), sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
}

func mustContain(t *testing.T, r result, wants ...string) {
	t.Helper()
	all := r.stdout + r.stderr
	for _, w := range wants {
		if !strings.Contains(all, w) {
			t.Errorf("output lacks %q\n%s", w, r)
		}
	}
}

const seedUsers = `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, email text);
INSERT INTO users SELECT g, 'first' || g || ' last' || g, 'u' || g || '@x' FROM generate_series(1, 1000) g`
