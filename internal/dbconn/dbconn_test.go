package dbconn

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// TestErrorClasses: what counts as the database going away (wait and start
// over) and what is a request the server refused (report it), also through
// layers of wrapping.
func TestErrorClasses(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("read state: %w", fmt.Errorf("query: %w", err)) }
	cases := []struct {
		name     string
		err      error
		connLoss bool
		lockTO   bool
	}{
		{"admin shutdown", &pgconn.PgError{Code: "57P01"}, true, false},
		{"cannot connect now", &pgconn.PgError{Code: "57P03"}, true, false},
		{"connection failure", &pgconn.PgError{Code: "08006"}, true, false},
		{"unexpected EOF", io.ErrUnexpectedEOF, true, false},
		{"network", &net.OpError{Op: "read", Err: errors.New("connection reset by peer")}, true, false},
		{"lock timeout", &pgconn.PgError{Code: "55P03"}, false, true},
		{"syntax error", &pgconn.PgError{Code: "42601"}, false, false},
		{"division by zero", &pgconn.PgError{Code: "22012"}, false, false},
		{"nil", nil, false, false},
	}
	for _, c := range cases {
		for _, err := range []error{c.err, wrap(c.err)} {
			if c.err == nil && err != nil {
				continue
			}
			if got := IsConnLoss(err); got != c.connLoss {
				t.Errorf("%s: IsConnLoss(%v) = %v", c.name, err, got)
			}
			if got := IsLockTimeout(err); got != c.lockTO {
				t.Errorf("%s: IsLockTimeout(%v) = %v", c.name, err, got)
			}
		}
	}
}

// TestRedactKeepsTheCause: the password leaves the text, the cause stays
// reachable by errors.As.
func TestRedactKeepsTheCause(t *testing.T) {
	pgErr := &pgconn.PgError{Code: "28P01", Message: `password authentication failed for "s3cret"`}
	err := fmt.Errorf("connect: %w", Redact(pgErr, "s3cret"))
	if got := err.Error(); strings.Contains(got, "s3cret") || !strings.Contains(got, "xxxxx") {
		t.Errorf("text %q still holds the password", got)
	}
	var back *pgconn.PgError
	if !errors.As(err, &back) || back.Code != "28P01" {
		t.Errorf("errors.As lost the PgError: %v", err)
	}
}
