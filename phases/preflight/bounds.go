package preflight

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// checkBounds reads the key range and the row count plan prints.
func checkBounds(ctx context.Context, in *inspection) (bool, error) {
	lo, hi, rows, err := in.table.Bounds(ctx, in.conn)
	if err != nil {
		return false, err
	}
	if rows == 0 && hi != nil {
		rows = countBriefly(ctx, in.conn, in.table)
	}
	in.r.Lo, in.r.Hi, in.r.Rows = lo, hi, rows
	return false, nil
}

// countBriefly counts a table that was never analyzed, in chunks, giving
// up after a few seconds (-1: unknown) so plan stays quick on a big table.
func countBriefly(ctx context.Context, conn *pgx.Conn, t *recompute.Table) int64 {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := snapshot.CountRows(cctx, conn, t)
	if err != nil {
		return -1
	}
	return n
}
