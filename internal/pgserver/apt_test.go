package pgserver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeAptGet puts on PATH an apt-get that records its arguments and
// environment in the returned file and exits with code.
func fakeAptGet(t *testing.T, code string) (record string) {
	t.Helper()
	dir := t.TempDir()
	record = filepath.Join(dir, "calls")
	script := "#!/bin/sh\necho \"$DEBIAN_FRONTEND $*\" >> " + record + "\necho 'E: Unable to locate package' >&2\nexit " + code + "\n"
	if err := os.WriteFile(filepath.Join(dir, "apt-get"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return record
}

func TestAptPackage(t *testing.T) {
	if os.Geteuid() != 0 {
		_ = fakeAptGet(t, "0")
		_, err := aptPackage{"postgresql-15"}.obtain(context.Background(), Options{}, nil)
		if !errors.Is(err, errSkipped) || !strings.Contains(err.Error(), "sudo apt-get install -y postgresql-15") {
			t.Fatalf("not root: %v, want skipped with the command to run", err)
		}
		return
	}
	t.Run("fails with apt-get's words", func(t *testing.T) {
		record := fakeAptGet(t, "100")
		_, err := aptPackage{"postgresql-15"}.obtain(context.Background(), Options{}, nil)
		if err == nil || errors.Is(err, errSkipped) || !strings.Contains(err.Error(), "Unable to locate package") {
			t.Fatalf("obtain: %v, want apt-get's error", err)
		}
		if b, _ := os.ReadFile(record); string(b) != "noninteractive update -q\n" {
			t.Errorf("apt-get ran %q", b)
		}
	})
	t.Run("installs", func(t *testing.T) {
		if _, err := inspect("/usr/lib/postgresql/15/bin"); err != nil {
			t.Skip("the fake apt-get installs nothing, and PostgreSQL 15 is not here already")
		}
		record := fakeAptGet(t, "0")
		b, err := aptPackage{"postgresql-15"}.obtain(context.Background(), Options{}, nil)
		if err != nil || b.Major != 15 {
			t.Fatalf("obtain: %+v, %v", b, err)
		}
		want := "noninteractive update -q\nnoninteractive install -y -q --no-install-recommends postgresql-15\n"
		if got, _ := os.ReadFile(record); string(got) != want {
			t.Errorf("apt-get ran %q, want %q", got, want)
		}
	})
}
