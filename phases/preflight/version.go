package preflight

import (
	"context"
	"fmt"

	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
)

// minServerVersion is the oldest server the daemon runs on
// (server_version_num).
const minServerVersion = 150000

// checkVersion refuses a server older than PostgreSQL 15.
func checkVersion(ctx context.Context, in *inspection) (bool, error) {
	version, versionText, err := pgfeature.Version(ctx, in.conn)
	if err != nil {
		return false, err
	}
	if version < minServerVersion {
		in.r.fail("server version", fmt.Sprintf("PostgreSQL %s found; cdcbackfill needs PostgreSQL %d or later (pgoutput's origin message and the replication functions it uses)", versionText, minServerVersion/10000),
			fmt.Sprintf("upgrade the server to PostgreSQL %d or later", minServerVersion/10000))
		return true, nil
	}
	in.r.ok("PostgreSQL " + versionText)
	return false, nil
}
