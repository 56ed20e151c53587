package dbconn

import (
	"context"
	"fmt"
	"time"
)

// LockTimeoutSQL is the statement that sets lock_timeout to d, in whole
// milliseconds and never below 1 ms: lock_timeout = 0 means no time-out,
// the one value that could queue the application behind the daemon for
// good. local sets it for the transaction (SET LOCAL), else the session.
func LockTimeoutSQL(d time.Duration, local bool) string {
	scope := "SET"
	if local {
		scope = "SET LOCAL"
	}
	return fmt.Sprintf("%s lock_timeout = %d", scope, max(d.Milliseconds(), 1))
}

// SetLockTimeout runs LockTimeoutSQL(d, local) on q.
func SetLockTimeout(ctx context.Context, q Querier, d time.Duration, local bool) error {
	if _, err := q.Exec(ctx, LockTimeoutSQL(d, local)); err != nil {
		return fmt.Errorf("set lock_timeout %s: %w", d, err)
	}
	return nil
}
