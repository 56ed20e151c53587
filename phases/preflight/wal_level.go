package preflight

import (
	"context"
	"fmt"
)

// checkWALLevel: logical decoding needs wal_level = logical.
func checkWALLevel(ctx context.Context, in *inspection) (bool, error) {
	var walLevel string
	if err := in.conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		return false, fmt.Errorf("read wal_level: %w", err)
	}
	if walLevel != "logical" {
		in.r.fail("wal_level", fmt.Sprintf("wal_level is %q, logical replication needs \"logical\"", walLevel),
			"ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")
	} else {
		in.r.ok("wal_level is logical")
	}
	return false, nil
}
