package phases

import (
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
)

// sqlState returns the SQLSTATE of a server error, or "".
func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

func isUndefinedTable(err error) bool { s := sqlState(err); return s == "42P01" || s == "3F000" }

// Lock not available (lock_timeout) and the errors a retry can cure.
func isLockTimeout(err error) bool { return sqlState(err) == "55P03" }
