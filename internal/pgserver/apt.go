package pgserver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// aptPackage installs a server package of the distribution with apt-get.
// Only root may, and only on a machine that has apt-get: elsewhere it is
// skipped, never run through sudo behind the user's back.
type aptPackage struct {
	name string // e.g. postgresql-15
}

func (a aptPackage) String() string { return "apt-get install " + a.name }

// cached is false: what apt-get installs, findInstalled finds.
func (aptPackage) cached(*cache) (Binaries, bool) { return Binaries{}, false }

func (a aptPackage) obtain(ctx context.Context, o Options, _ *cache) (Binaries, error) {
	aptGet, err := exec.LookPath("apt-get")
	if err != nil {
		return Binaries{}, fmt.Errorf("%w: no apt-get on this machine", errSkipped)
	}
	if os.Geteuid() != 0 {
		return Binaries{}, fmt.Errorf("%w: only root may install packages (run: sudo apt-get install -y %s)", errSkipped, a.name)
	}
	begin := time.Now()
	fmt.Fprintf(o.progress(), "installing %s with apt-get (once for this machine)...\n", a.name)
	// The package lists of a fresh machine or container are empty.
	for _, args := range [][]string{{"update", "-q"}, {"install", "-y", "-q", "--no-install-recommends", a.name}} {
		cmd := exec.CommandContext(ctx, aptGet, args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return Binaries{}, fmt.Errorf("apt-get %s: %w\n%s", strings.Join(args, " "), err, tail(out, 2048))
		}
	}
	// Debian and Ubuntu put each major version's server in its own
	// directory; the package name ends with that version.
	major := a.name[strings.LastIndex(a.name, "-")+1:]
	b, err := inspect(filepath.Join("/usr/lib/postgresql", major, "bin"))
	if err != nil {
		return Binaries{}, fmt.Errorf("after installing %s: %w", a.name, err)
	}
	fmt.Fprintf(o.progress(), "installed %s in %s\n", a.name, time.Since(begin).Round(100*time.Millisecond))
	b.From = "installed now by apt-get"
	return b, nil
}

// tail returns the last n bytes of b.
func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
