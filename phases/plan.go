package phases

import (
	"context"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/phases/preflight"
)

// Inspect is `plan`: the preflight checks of the config against the
// database (see package preflight); it changes nothing.
func Inspect(ctx context.Context, cfg *config.Config) (*preflight.Report, error) {
	return preflight.Inspect(ctx, cfg)
}
