package preflight

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// A preflight check looks at one thing and adds its lines to the report.
// It returns stop when the checks after it cannot run (no connection, no
// table); an error only when the database could not be asked.
type check func(ctx context.Context, in *inspection) (stop bool, err error)

// checks is every check, in the order plan prints them; adding one is a
// file with its function and a line here.
var checks = []check{
	checkVersion,
	checkWALLevel,
	checkState,
	checkTable,
	checkReplicaIdentity,
	checkColumns,
	checkDDL,
	checkExpressions,
	checkReplication,
	checkStandbys,
	checkPrivileges,
	checkStatements,
	checkServerFeatures,
	checkBounds,
	checkCost,
}

// inspection is what the checks share.
type inspection struct {
	r     *Report
	cfg   *config.Config
	conn  *pgx.Conn
	table *recompute.Table // set by checkTable
}

// Inspect checks the configuration against the database and changes
// nothing. Checks after a failed one that they depend on are left out.
func Inspect(ctx context.Context, cfg *config.Config) (*Report, error) {
	r := &Report{}
	conn, err := dbconn.Connect(ctx, cfg.Database.DSN)
	if err != nil {
		r.fail("connect", err.Error(), "check database.dsn (or CDCBACKFILL_DATABASE_DSN) and that the server answers")
		return r, nil
	}
	defer conn.Close(context.Background())
	r.ok("connect to " + dbconn.RedactDSN(cfg.Database.DSN))
	in := &inspection{r: r, cfg: cfg, conn: conn}
	for _, c := range checks {
		stop, err := c(ctx, in)
		if err != nil {
			return nil, err
		}
		if stop {
			break
		}
	}
	return r, nil
}
