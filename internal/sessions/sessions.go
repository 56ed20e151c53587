// Package sessions names the other sessions that hold the daemon up, for
// error messages a user can act on: "pid 123 (idle in transaction for 2m:
// "SELECT ...")".
package sessions

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// Describe lists up to limit sessions of pg_stat_activity (alias a) that
// match where (args are its parameters), oldest transaction first. It
// returns "" when none matches, and the error when the query fails.
func Describe(ctx context.Context, q dbconn.Querier, limit int, where string, args ...any) (string, error) {
	rows, err := q.Query(ctx, fmt.Sprintf(`SELECT a.pid, coalesce(a.state, ''), coalesce(now() - a.xact_start, '0'), left(a.query, 200)
		FROM pg_stat_activity a
		WHERE (%s) AND a.pid <> pg_backend_pid()
		ORDER BY a.xact_start LIMIT %d`, where, limit), args...)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var parts []string
	for rows.Next() {
		var pid int
		var state, query string
		var age time.Duration
		if err := rows.Scan(&pid, &state, &age, &query); err != nil {
			return "", err
		}
		parts = append(parts, fmt.Sprintf("pid %d (%s for %s: %q)", pid, state, age.Round(time.Second), query))
	}
	return strings.Join(parts, ", "), rows.Err()
}
