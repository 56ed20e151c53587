package pgfeature

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// ErrNoStatements says why the protection is not available.
var ErrNoStatements = errors.New("pg_stat_statements is not installed in this database")

// StatementsView finds pg_stat_statements and checks that it answers and
// that its query texts are readable by the role.
func StatementsView(ctx context.Context, q dbconn.Querier) (string, error) {
	var schema string
	err := q.QueryRow(ctx, `SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
		WHERE e.extname = 'pg_stat_statements'`).Scan(&schema)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", ErrNoStatements
	}
	if err != nil {
		return "", err
	}
	view := pgx.Identifier{schema, "pg_stat_statements"}.Sanitize()
	var readable bool
	if err := q.QueryRow(ctx, `SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
		OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')`).Scan(&readable); err != nil {
		return "", err
	}
	if !readable {
		return "", errors.New("the role may not read other roles' statements: GRANT pg_read_all_stats TO <role>")
	}
	if _, err := q.Exec(ctx, "SELECT 1 FROM "+view+" LIMIT 1"); err != nil {
		return "", fmt.Errorf("pg_stat_statements does not answer (is it in shared_preload_libraries?): %w", err)
	}
	return view, nil
}
