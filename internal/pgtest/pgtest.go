package pgtest

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/cdcbackfill/cdcbackfill/internal/pgserver"
)

// EnvDSN names the environment variable holding the superuser DSN of an
// existing server to use instead of starting one.
const EnvDSN = pgserver.EnvDSN

// ErrRestartUnsupported is returned by Restart for a server given by EnvDSN.
var ErrRestartUnsupported = pgserver.ErrRestartUnsupported

// Server is a running PostgreSQL server; see pgserver.Server.
type Server = pgserver.Server

// Start starts (or attaches to) a server, see the package documentation.
func Start(ctx context.Context) (*Server, error) {
	return StartWithLog(ctx, nil)
}

// StartWithLog is Start writing progress lines to log, which may be nil.
func StartWithLog(ctx context.Context, log io.Writer) (*Server, error) {
	o, err := pgserver.OptionsFromEnv()
	if err != nil {
		return nil, err
	}
	o.Logf = func(string, ...any) {}
	if log != nil {
		o.Logf = func(format string, args ...any) { fmt.Fprintf(log, "pgtest: "+format+"\n", args...) }
		o.Progress = log
	}
	if o.DSN != "" {
		return pgserver.Start(ctx, o)
	}

	begin := time.Now()
	var dockerErr error
	if o.BinDir != "" {
		o.Logf("%s is set: not trying Docker", pgserver.EnvBinDir)
	} else if err := dockerAvailable(ctx); err != nil {
		o.Logf("no Docker engine (%v)", err)
	} else {
		image := dockerImage(o.Version)
		srv, err := startDocker(ctx, image, o.Logf)
		if err == nil {
			o.Logf("container %s ready at %s in %s", image, srv.DSN(), time.Since(begin).Round(time.Millisecond))
			return srv, nil
		}
		dockerErr = err
		o.Logf("docker: %v; trying local binaries", err)
	}

	srv, err := pgserver.Start(ctx, o)
	if err != nil {
		if dockerErr != nil {
			return nil, fmt.Errorf("%w (docker: %v)", err, dockerErr)
		}
		return nil, err
	}
	return srv, nil
}
