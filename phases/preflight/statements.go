package preflight

import (
	"context"
	"fmt"
	"strings"

	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
)

// checkStatements says whether the contract can wait until nothing uses
// the old column (pg_stat_statements).
func checkStatements(ctx context.Context, in *inspection) (bool, error) {
	r, conn, cfg := in.r, in.conn, in.cfg
	old := ddl.DroppedColumns(cfg.Contract)
	if len(old) == 0 {
		return false, nil
	}
	if _, err := pgfeature.StatementsView(ctx, conn); err != nil {
		r.info("old column usage", fmt.Sprintf("not watched: %v; the contract then relies on parity alone to tell that nothing still writes %s", err, strings.Join(old, ", ")),
			"CREATE EXTENSION pg_stat_statements (with shared_preload_libraries = 'pg_stat_statements') to have the contract wait until no statement uses it")
		return false, nil
	}
	r.ok(fmt.Sprintf("old column usage: pg_stat_statements shows the statements that still use %s; the contract waits (auto) or needs approve --force (manual) while any runs", strings.Join(old, ", ")))
	return false, nil
}
