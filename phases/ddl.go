package phases

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
)

// DDLRunner is the one DDL runner, internal/ddl's, under the name the
// phases know it by.
type DDLRunner ddl.Runner

// DDLResult is what running one statement cost.
type DDLResult = ddl.Result

// Run runs stmt under lock_timeout, retried (ddl.Runner.Run).
func (d DDLRunner) Run(ctx context.Context, conn *pgx.Conn, stmt string, record func(pgx.Tx) error) (DDLResult, error) {
	return ddl.Runner(d).Run(ctx, conn, stmt, record)
}

// blockers names the sessions holding locks on the table.
func (d DDLRunner) blockers(ctx context.Context, conn *pgx.Conn) string {
	return ddl.Runner(d).Blockers(ctx, conn)
}
