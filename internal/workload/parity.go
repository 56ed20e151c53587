package workload

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// CreateExpected creates the table that records what each row's new
// columns must hold, filled with what the expressions make of every row
// now (the rows the backfill will fill).
func CreateExpected(ctx context.Context, q dbconn.Querier, table string) error {
	t := pgx.Identifier{table}.Sanitize()
	for _, sql := range []string{
		`CREATE TABLE ` + t + ` (id bigint PRIMARY KEY, first_name text, last_name text)`,
		`INSERT INTO ` + t + ` SELECT id, split_part(full_name, ' ', 1), split_part(full_name, ' ', 2) FROM users`,
	} {
		if _, err := q.Exec(ctx, sql); err != nil {
			return fmt.Errorf("create %s: %w", table, err)
		}
	}
	return nil
}

// DifferFromExpected counts the rows whose new columns differ from what
// the application last wrote, or that are on one side only, and the rows
// of users.
func DifferFromExpected(ctx context.Context, q dbconn.Querier, table string) (differ, rows int64, err error) {
	err = q.QueryRow(ctx, `SELECT count(*) FILTER (WHERE u.id IS NULL OR e.id IS NULL
			OR u.first_name IS DISTINCT FROM e.first_name OR u.last_name IS DISTINCT FROM e.last_name),
		count(u.id)
		FROM users u FULL JOIN `+pgx.Identifier{table}.Sanitize()+` e ON e.id = u.id`).Scan(&differ, &rows)
	if err != nil {
		return 0, 0, fmt.Errorf("compare users with %s: %w", table, err)
	}
	return differ, rows, nil
}

// OutOfParity counts the rows whose new columns differ from the
// expressions, by SQL independent of the daemon's.
func OutOfParity(ctx context.Context, q dbconn.Querier) (int64, error) {
	var n int64
	err := q.QueryRow(ctx, `SELECT count(*) FROM users
		WHERE first_name IS DISTINCT FROM split_part(full_name, ' ', 1)
		   OR last_name IS DISTINCT FROM split_part(full_name, ' ', 2)`).Scan(&n)
	return n, err
}
