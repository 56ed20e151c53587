package phases

import (
	"errors"
	"io"
	"net"
	"strings"

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

// isConnLoss is true for errors that mean the database went away (a
// restart, a terminated session, a network cut), not that a request was
// wrong.
func isConnLoss(err error) bool {
	if errors.Is(err, errLostLeadership) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return true
	}
	var netErr *net.OpError
	if errors.As(err, &netErr) {
		return true
	}
	switch s := sqlState(err); {
	case s == "57P01", s == "57P02", s == "57P03", strings.HasPrefix(s, "08"):
		return true
	case s != "":
		return false
	}
	if pgconn.SafeToRetry(err) || pgconn.Timeout(err) {
		return true
	}
	msg := err.Error()
	return strings.Contains(msg, "conn closed") || strings.Contains(msg, "connection reset") ||
		strings.Contains(msg, "broken pipe") || strings.Contains(msg, "failed to connect") ||
		strings.Contains(msg, "unexpected EOF")
}
