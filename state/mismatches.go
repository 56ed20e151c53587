package state

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// A row out of parity while the application owns the new columns is kept
// until a check finds it in parity again (the application fixed it, or
// deleted the row) or an operator accepts it. It holds the contract while
// it is neither.

// MismatchRow is one row out of parity, as kept.
type MismatchRow struct {
	Key       recompute.Key `json:"key"`
	Actual    []*string     `json:"actual"`
	Expected  []*string     `json:"expected"`
	FirstSeen time.Time     `json:"first_seen"`
	Accepted  bool          `json:"accepted"`
}

// RecordMismatches keeps the rows found out of parity. A row accepted
// before stays accepted only while it holds the same values.
func (s Store) RecordMismatches(ctx context.Context, q dbconn.Querier, found []recompute.Mismatch) error {
	if len(found) == 0 {
		return nil
	}
	b := &pgx.Batch{}
	for _, m := range found {
		b.Queue(`INSERT INTO cdcbackfill.mismatches (name, key, actual, expected) VALUES ($1, $2, $3, $4)
			ON CONFLICT (name, key) DO UPDATE SET actual = EXCLUDED.actual, expected = EXCLUDED.expected, last_seen = now(),
				accepted = mismatches.accepted AND mismatches.actual IS NOT DISTINCT FROM EXCLUDED.actual`,
			s.Name, []string(m.Key), m.Actual, m.Expected)
	}
	b.Queue(`UPDATE cdcbackfill.migrations SET verify_mismatches = verify_mismatches + $2, updated_at = now() WHERE name = $1`,
		s.Name, len(found))
	if err := sendBatch(ctx, q, b); err != nil {
		return fmt.Errorf("record rows out of parity of %q: %w", s.Name, err)
	}
	return nil
}

// sendBatch runs b in one round trip where q can (a connection, a pool, a
// transaction), else statement by statement.
func sendBatch(ctx context.Context, q dbconn.Querier, b *pgx.Batch) error {
	type batcher interface {
		SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
	}
	if bq, ok := q.(batcher); ok {
		return bq.SendBatch(ctx, b).Close()
	}
	for _, qq := range b.QueuedQueries {
		if _, err := q.Exec(ctx, qq.SQL, qq.Arguments...); err != nil {
			return err
		}
	}
	return nil
}

// ClearMismatches forgets the rows of keys, found in parity again, and
// returns how many it forgot.
func (s Store) ClearMismatches(ctx context.Context, q dbconn.Querier, keys []recompute.Key) (int64, error) {
	if len(keys) == 0 {
		return 0, nil
	}
	// Compared as one text per key: a two-dimensional array parameter
	// unnests flat.
	texts := make([]string, len(keys))
	for i, k := range keys {
		texts[i] = k.StoredID()
	}
	tag, err := q.Exec(ctx, `DELETE FROM cdcbackfill.mismatches WHERE name = $1 AND array_to_string(key, chr(1)) = ANY($2)`, s.Name, texts)
	if err != nil {
		return 0, fmt.Errorf("forget rows back in parity of %q: %w", s.Name, err)
	}
	return tag.RowsAffected(), nil
}

// Outstanding counts the rows out of parity not accepted, and returns up to
// limit of them, oldest first.
func (s Store) Outstanding(ctx context.Context, q dbconn.Querier, limit int) (int64, []MismatchRow, error) {
	var n int64
	if err := q.QueryRow(ctx, `SELECT count(*) FROM cdcbackfill.mismatches WHERE name = $1 AND NOT accepted`, s.Name).Scan(&n); err != nil {
		return 0, nil, fmt.Errorf("count rows out of parity of %q: %w", s.Name, err)
	}
	if n == 0 || limit == 0 {
		return n, nil, nil
	}
	rows, err := s.mismatchRows(ctx, q, "NOT accepted", limit)
	return n, rows, err
}

// MismatchKeys returns up to limit kept keys, accepted or not, least
// recently seen first: the ones to check again.
func (s Store) MismatchKeys(ctx context.Context, q dbconn.Querier, limit int) ([]recompute.Key, error) {
	rows, err := s.mismatchRows(ctx, q, "true", limit)
	keys := make([]recompute.Key, len(rows))
	for i, r := range rows {
		keys[i] = r.Key
	}
	return keys, err
}

func (s Store) mismatchRows(ctx context.Context, q dbconn.Querier, where string, limit int) ([]MismatchRow, error) {
	rows, err := q.Query(ctx, `SELECT key, actual, expected, first_seen, accepted FROM cdcbackfill.mismatches
		WHERE name = $1 AND `+where+` ORDER BY last_seen LIMIT $2`, s.Name, limit)
	if err != nil {
		return nil, fmt.Errorf("read rows out of parity of %q: %w", s.Name, err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (MismatchRow, error) {
		var m MismatchRow
		var key []string
		err := r.Scan(&key, &m.Actual, &m.Expected, &m.FirstSeen, &m.Accepted)
		m.Key = key
		return m, err
	})
}

// AcceptedAsIs returns the keys (Key.ID) of found that an operator
// accepted with the values they hold now.
func (s Store) AcceptedAsIs(ctx context.Context, q dbconn.Querier, found []recompute.Mismatch) (map[string]bool, error) {
	out := map[string]bool{}
	for _, m := range found {
		var ok bool
		err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM cdcbackfill.mismatches
			WHERE name = $1 AND key = $2 AND accepted AND actual IS NOT DISTINCT FROM $3)`, s.Name, []string(m.Key), m.Actual).Scan(&ok)
		if err != nil {
			return nil, fmt.Errorf("contract: look up accepted rows: %w", err)
		}
		if ok {
			out[m.Key.ID()] = true
		}
	}
	return out, nil
}

// AcceptMismatches accepts the rows out of parity kept now: they keep the
// application's values and no longer hold the contract. It returns how
// many, and logs it.
func (s Store) AcceptMismatches(ctx context.Context, q dbconn.Querier, phase Phase) (int64, error) {
	tag, err := q.Exec(ctx, `UPDATE cdcbackfill.mismatches SET accepted = true WHERE name = $1 AND NOT accepted`, s.Name)
	if err != nil {
		return 0, fmt.Errorf("accept rows out of parity of %q: %w", s.Name, err)
	}
	n := tag.RowsAffected()
	if err := s.update(ctx, q, "accepted_mismatches = accepted_mismatches + $2", n); err != nil {
		return 0, err
	}
	return n, s.Event(ctx, q, phase, "accept_mismatches", map[string]any{"rows": n})
}
