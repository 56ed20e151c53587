package pgserver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// minMajor is the oldest server the daemon supports (the protocol and
// catalog features DESIGN.md relies on).
const minMajor = 15

// Binaries are the server programs of one major version.
type Binaries struct {
	Dir   string // holds initdb and postgres
	Major int
	From  string // where they came from, for the log
}

// Obtain returns the server binaries Options ask for (see the package
// documentation).
func Obtain(ctx context.Context, o Options) (Binaries, error) {
	if o.BinDir != "" {
		b, err := inspect(o.BinDir)
		if err != nil {
			return Binaries{}, fmt.Errorf("%s: %w", EnvBinDir, err)
		}
		if o.Version != 0 && b.Major != o.Version {
			return Binaries{}, fmt.Errorf("%s=%s holds PostgreSQL %d, but %s=%d", EnvBinDir, o.BinDir, b.Major, EnvVersion, o.Version)
		}
		b.From = "given by " + EnvBinDir
		return b, nil
	}

	installed, tooOld := findInstalled()
	if o.Version == 0 && len(installed) > 0 {
		return installed[len(installed)-1], nil
	}
	if i := slices.IndexFunc(installed, func(b Binaries) bool { return b.Major == o.Version }); i >= 0 {
		return installed[i], nil
	}
	what := "PostgreSQL " + strconv.Itoa(minMajor) + " or later"
	if o.Version != 0 {
		what = "PostgreSQL " + strconv.Itoa(o.Version)
	}
	if len(tooOld) > 0 {
		what += " (found only " + strings.Join(tooOld, ", ") + ")"
	}
	return Binaries{}, fmt.Errorf("no %s installed: install the server (apt-get install -y postgresql), set %s to its bin directory, or set %s", what, EnvBinDir, EnvDSN)
}

// binDirPatterns are where installed server binaries are looked for, after
// PATH.
var binDirPatterns = []string{
	"/usr/lib/postgresql/*/bin", // Debian, Ubuntu
	"/usr/pgsql-*/bin",          // PGDG RPMs
	"/usr/local/pgsql/bin",      // source builds
	"/opt/homebrew/opt/postgresql@*/bin",
	"/usr/local/opt/postgresql@*/bin",
}

// findInstalled returns the server binaries installed on this machine, of
// version minMajor or later, one per major version, lowest first; and a
// description of those that are too old.
func findInstalled() (found []Binaries, tooOld []string) {
	var candidates []string
	for _, name := range []string{"postgres", "initdb"} {
		if p, err := exec.LookPath(name); err == nil {
			if real, err := filepath.EvalSymlinks(p); err == nil {
				p = real
			}
			candidates = append(candidates, filepath.Dir(p))
		}
	}
	for _, pattern := range binDirPatterns {
		matches, _ := filepath.Glob(pattern)
		candidates = append(candidates, matches...)
	}
	for _, d := range candidates {
		b, err := inspect(d)
		switch {
		case err != nil:
		case b.Major < minMajor:
			tooOld = append(tooOld, fmt.Sprintf("%d in %s", b.Major, d))
		case !slices.ContainsFunc(found, func(f Binaries) bool { return f.Major == b.Major }):
			b.From = "installed"
			found = append(found, b)
		}
	}
	slices.SortFunc(found, func(a, b Binaries) int { return a.Major - b.Major })
	return found, tooOld
}

var versionRE = regexp.MustCompile(`\(PostgreSQL\) (\d+)`)

// inspect checks that dir holds initdb and postgres and asks postgres its
// version.
func inspect(dir string) (Binaries, error) {
	for _, name := range []string{"initdb", "postgres"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || !fi.Mode().IsRegular() {
			return Binaries{}, fmt.Errorf("no %s in %s", name, dir)
		}
	}
	out, err := exec.Command(filepath.Join(dir, "postgres"), "--version").Output()
	if err != nil {
		return Binaries{}, fmt.Errorf("%s --version: %w", filepath.Join(dir, "postgres"), err)
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		return Binaries{}, fmt.Errorf("%s --version printed %q, not a PostgreSQL version", filepath.Join(dir, "postgres"), strings.TrimSpace(string(out)))
	}
	major, _ := strconv.Atoi(string(m[1]))
	return Binaries{Dir: dir, Major: major}, nil
}
