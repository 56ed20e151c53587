package recompute

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// Key is a primary key value, each column in its text form.
type Key []string

// ID is k as one string, for sets and maps of keys. PostgreSQL text cannot
// hold a NUL byte, so NUL separates the columns unambiguously.
func (k Key) ID() string { return strings.Join(k, "\x00") }

// StoredID is k as one string the server computes too, from a key stored
// as text[]: array_to_string(key, chr(1)). A parameter cannot carry ID's
// NUL; chr(1) does not occur in a key's text in practice.
func (k Key) StoredID() string { return strings.Join(k, "\x01") }

// KeyString renders a key as PostgreSQL does in its messages: (a, b)=(1, x).
func (t *Table) KeyString(k Key) string { return FormatKey(t.KeyNames(), k) }

// FormatKey renders key k of columns names as PostgreSQL does in its
// messages: (a, b)=(1, x).
func FormatKey(names []string, k Key) string {
	return "(" + strings.Join(names, ", ") + ")=(" + strings.Join(k, ", ") + ")"
}

// KeyNamesOf reads the primary key's column names of table (quoted,
// schema-qualified), in index order.
func KeyNamesOf(ctx context.Context, q Querier, table string) ([]string, error) {
	rows, err := q.Query(ctx, keyColumnsSQL, table)
	if err != nil {
		return nil, fmt.Errorf("read primary key of %s: %w", table, err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
		var name, typ string
		err := r.Scan(&name, &typ)
		return name, err
	})
}

// Result is what one recompute statement did.
type Result struct {
	Scanned   int64    // keys looked at (Range only)
	Corrected int64    // rows whose new columns were written
	Last      Key      // the highest key scanned (Range only), nil when none
	Skipped   []Key    // keys out of parity and held by another transaction
	Samples   []string // a few corrected keys (Keys only), shown as (k)=(v), for the operator
	// Snapshot is the statement's own snapshot as pg_current_snapshot()
	// prints it (Keys and KeysFast): a transaction running in it had
	// changes the statement could not see.
	Snapshot string
	// Handover is the hand-over position the statement's Gate found
	// recorded, as pg_lsn prints it; the statement then wrote nothing. ""
	// while the expressions own the new columns, or without a gate.
	Handover string
}

// Gate closes the daemon's corrections at the hand-over. The act that
// records the hand-over (approve, or the detection of dual-write) takes
// the Lock's lock exclusively in its own transaction; a gated statement
// runs after Lock, in one implicit transaction with it, so its snapshot is
// taken once that act has either committed (the statement sees the
// hand-over and writes nothing) or not begun (it waits for the statement).
// So no correction reads a row the application wrote after the hand-over
// returned.
type Gate struct {
	// Lock takes, until its transaction ends, the shared side of the lock
	// the hand-over takes exclusively (a statement).
	Lock string
	// Handover is a scalar subquery: the recorded hand-over position as
	// text, NULL while the expressions own the new columns.
	Handover string
}

// Batcher is a connection that sends statements in one implicit
// transaction (pgx.Conn, pgx.Tx).
type Batcher interface {
	Querier
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

// handoverSQL is the gate's hand-over subquery, or a NULL without a gate.
func (g *Gate) handoverSQL() string {
	if g == nil {
		return "NULL::text"
	}
	return "(" + g.Handover + ")"
}

// query runs sql after the gate's lock, in one implicit transaction; fn
// reads its rows.
func (g *Gate) query(ctx context.Context, q Batcher, sql string, args []any, fn func(pgx.Rows) error) error {
	if g == nil {
		rows, err := q.Query(ctx, sql, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		if err := fn(rows); err != nil {
			return err
		}
		return rows.Err()
	}
	b := &pgx.Batch{}
	b.Queue(g.Lock)
	b.Queue(sql, args...)
	br := q.SendBatch(ctx, b)
	if _, err := br.Exec(); err != nil {
		br.Close()
		return err
	}
	rows, err := br.Query()
	if err == nil {
		err = fn(rows)
		rows.Close()
		if err == nil {
			err = rows.Err()
		}
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	return err
}

// maxSamples bounds the corrected keys a statement returns.
const maxSamples = 5

// lockAndUpdate locks, among the keys in _cdcb_keys, the rows out of parity
// that nobody else holds, in key order without waiting (SKIP LOCKED), and
// with NO KEY UPDATE (the key never changes), so the application's foreign
// key checks (KEY SHARE) neither wait for a batch nor make it skip rows;
// recomputes them; the final SELECT reports the count and the skipped keys.
// The UPDATE finds the locked rows by ctid (a TID scan, no index lookups)
// and does not test parity again: the lock's re-check (EvalPlanQual) saw the
// row's latest version out of parity, and the lock keeps it so. One case
// passes by: a row changed by the application after this statement's
// snapshot was taken and before it was locked is locked in its new version,
// which the snapshot cannot see, so the UPDATE does not write it. That
// change committed after the slot's consistent point, so the stream brings
// its key back and the applier recomputes it from the row as it is then.
// keysFilter restricts the table to the candidate keys.
func (t *Table) lockAndUpdate(keysFilter string) string {
	tbl := t.Ident()
	return fmt.Sprintf(`,
_cdcb_locked AS (
	SELECT %[2]s FROM %[1]s
	WHERE %[3]s AND %[4]s
	ORDER BY %[5]s
	FOR NO KEY UPDATE SKIP LOCKED
),
_cdcb_upd AS (
	UPDATE %[1]s SET %[6]s
	WHERE ctid = ANY (ARRAY(SELECT _cdcb_ctid FROM _cdcb_locked))
	RETURNING %[11]s
),
_cdcb_skipped AS (
	SELECT ARRAY[%[8]s] AS key FROM _cdcb_keys k
	WHERE NOT EXISTS (SELECT 1 FROM _cdcb_locked l WHERE ROW(%[9]s) = ROW(%[10]s))
	  AND EXISTS (SELECT 1 FROM %[1]s WHERE ROW(%[5]s) = ROW(%[10]s) AND %[4]s)
)`,
		tbl,
		t.selectSlots()+", "+tbl+".ctid AS _cdcb_ctid", keysFilter, t.outOfParity(), t.keyList(),
		t.setList(), t.slots("_cdcb_locked.", ""),
		t.slots("k.", "::text"), t.slots("l.", ""), t.slots("k.", ""),
		"ARRAY["+t.textKeys()+"] AS key")
}

// selectSlots is "T.k1 AS _cdcb_k0, T.k2 AS _cdcb_k1".
func (t *Table) selectSlots() string {
	parts := make([]string, len(t.Key))
	for i, k := range t.Key {
		parts[i] = fmt.Sprintf("%s.%s AS _cdcb_k%d", t.Ident(), pgx.Identifier{k.Name}.Sanitize(), i)
	}
	return strings.Join(parts, ", ")
}

// keysCTE is the CTE _cdcb_keys: the distinct keys of the parameters (one
// text[] per key column, the i-th elements together forming one key), cast
// to the key's types, with the keysIn condition that selects their rows.
func (t *Table) keysCTE() (cte, keysIn string) {
	unnest := make([]string, len(t.Key))
	casts := make([]string, len(t.Key))
	for i, k := range t.Key {
		unnest[i] = fmt.Sprintf("$%d::text[]", i+1)
		casts[i] = fmt.Sprintf("_cdcb_k%d::%s AS _cdcb_k%d", i, k.Type, i)
	}
	cte = fmt.Sprintf(`WITH _cdcb_keys AS (
	SELECT DISTINCT %s FROM unnest(%s) AS u(%s)
)`, strings.Join(casts, ", "), strings.Join(unnest, ", "), t.slots("", ""))
	return cte, fmt.Sprintf("ROW(%s) IN (SELECT %s FROM _cdcb_keys)", t.keyList(), t.slots("", ""))
}

// samplesSQL selects up to maxSamples keys of _cdcb_upd as KeyString writes them.
func (t *Table) samplesSQL() string {
	return fmt.Sprintf(`(SELECT array_agg(%s || '=(' || array_to_string(u.key, ', ') || ')') FROM (SELECT key FROM _cdcb_upd LIMIT %d) u)`,
		dbconn.QuoteLiteral(t.keyLabel()), maxSamples)
}

// KeysSQL recomputes the rows of the given keys (parameters: see keysCTE).
func (t *Table) KeysSQL() string { return t.keysSQL(nil) }

// keysSQL is KeysSQL closed by gate (nil: none): while the hand-over is
// recorded it locks and writes nothing, and reports the position.
func (t *Table) keysSQL(gate *Gate) string {
	cte, keysIn := t.keysCTE()
	if gate != nil {
		keysIn += " AND " + gate.handoverSQL() + " IS NULL"
	}
	return cte + t.lockAndUpdate(keysIn) + fmt.Sprintf(`
SELECT (SELECT count(*) FROM _cdcb_upd), %s, s.key, pg_current_snapshot()::text, %s
FROM (SELECT 1) AS _cdcb_one LEFT JOIN _cdcb_skipped s ON true`, t.samplesSQL(), gate.handoverSQL())
}

// FastLockTimeout bounds how long a plain recompute statement (FastRange,
// KeysFast) waits for a row the application holds before it gives up and
// the caller passes over held rows instead. It must stay far below
// deadlock_timeout (1s by default): the daemon then always gives up before
// a deadlock check could abort the application.
const FastLockTimeout = 10 * time.Millisecond

// keysFastSQL is KeysSQL without the row locks taken ahead: one UPDATE of
// the keys' rows that are out of parity. Waiting for a row lock re-checks
// the row's latest version (EvalPlanQual), so a row changed meanwhile is
// computed from that version.
// With a gate, it writes nothing once the hand-over is recorded.
func (t *Table) keysFastSQL(gate *Gate) string {
	cte, keysIn := t.keysCTE()
	if gate != nil {
		keysIn += " AND " + gate.handoverSQL() + " IS NULL"
	}
	return cte + fmt.Sprintf(`,
_cdcb_upd AS (
	UPDATE %s SET %s
	WHERE %s AND %s
	RETURNING ARRAY[%s] AS key
)
SELECT (SELECT count(*) FROM _cdcb_upd), %s, pg_current_snapshot()::text, %s`,
		t.Ident(), t.setList(), keysIn, t.outOfParity(), t.textKeys(), t.samplesSQL(), gate.handoverSQL())
}

// KeysFast recomputes the rows of keys in one UPDATE. Run it under
// lock_timeout = FastLockTimeout: when the application holds one of the
// rows longer, it fails with an error dbconn.IsLockTimeout recognizes, having
// changed nothing, and the caller runs Keys, which passes over held rows.
// Row locks taken ahead (Keys) cost a WAL record and a page write per row,
// so they are paid only where there is contention.
// With a gate (nil: none) it writes nothing once the hand-over is
// recorded, and Result.Handover says where it is.
func (t *Table) KeysFast(ctx context.Context, q Batcher, gate *Gate, keys []Key) (Result, error) {
	if len(keys) == 0 {
		return Result{}, nil
	}
	var res Result
	var handover *string
	err := gate.query(ctx, q, t.keysFastSQL(gate), keyColumns(t, keys), func(rows pgx.Rows) error {
		for rows.Next() {
			if err := rows.Scan(&res.Corrected, &res.Samples, &res.Snapshot, &handover); err != nil {
				return err
			}
		}
		return nil
	})
	if handover != nil {
		res.Handover = *handover
	}
	return res, err
}

// keyColumns turns keys into one text[] per key column, the i-th elements
// together forming one key (the parameters of KeysSQL and keysFastSQL).
func keyColumns(t *Table, keys []Key) []any {
	cols := make([]any, len(t.Key))
	for i := range t.Key {
		col := make([]string, len(keys))
		for j, k := range keys {
			col[j] = k[i]
		}
		cols[i] = col
	}
	return cols
}

// Keys recomputes the rows of keys (missing rows are ignored: a deleted row
// needs nothing).
func (t *Table) Keys(ctx context.Context, q Batcher, keys []Key) (Result, error) {
	return t.KeysGated(ctx, q, nil, keys)
}

// KeysGated is Keys closed by gate: once the hand-over is recorded it
// locks and writes nothing, and Result.Handover says where it is.
func (t *Table) KeysGated(ctx context.Context, q Batcher, gate *Gate, keys []Key) (Result, error) {
	if len(keys) == 0 {
		return Result{}, nil
	}
	var res Result
	err := gate.query(ctx, q, t.keysSQL(gate), keyColumns(t, keys), func(rows pgx.Rows) error {
		for rows.Next() {
			var skipped, samples []string
			var handover *string
			if err := rows.Scan(&res.Corrected, &samples, &skipped, &res.Snapshot, &handover); err != nil {
				return err
			}
			if skipped != nil {
				res.Skipped = append(res.Skipped, skipped)
			}
			if res.Samples == nil {
				res.Samples = samples
			}
			if handover != nil {
				res.Handover = *handover
			}
		}
		return nil
	})
	if err != nil {
		return Result{}, err
	}
	return res, nil
}

// rangeKeys selects up to $n keys after $lo (exclusive; absent for the first
// batch) up to $hi (inclusive). It also returns the lower-bound condition.
func (t *Table) rangeKeys(withLow bool, extra string) (sql, low string) {
	n := len(t.Key)
	var where []string
	next := 1
	if withLow {
		low = fmt.Sprintf("ROW(%s) > ROW(%s)", t.keyList(), t.keyParams(next))
		where = append(where, low)
		next += n
	}
	where = append(where, fmt.Sprintf("ROW(%s) <= ROW(%s)", t.keyList(), t.keyParams(next)))
	next += n
	sql = fmt.Sprintf(`WITH _cdcb_keys AS (
	SELECT %s%s FROM %s
	WHERE %s
	ORDER BY %s
	LIMIT $%d
)`, t.selectSlots(), extra, t.Ident(), strings.Join(where, " AND "), t.keyList(), next)
	return sql, low
}

// lastSlots selects the highest key of _cdcb_keys, its columns cast by
// suffix; an aggregate where the key has one column (no sort).
func (t *Table) lastSlots(suffix string) string {
	if t.maxable() {
		return "(SELECT max(_cdcb_k0)" + suffix + " FROM _cdcb_keys)"
	}
	return fmt.Sprintf("(SELECT %s FROM _cdcb_keys ORDER BY %s LIMIT 1)", t.slots("", suffix), t.descSlots())
}

// maxable is true for a one-column key of a type with a max() aggregate
// (uuid has none before PostgreSQL 16).
func (t *Table) maxable() bool {
	if len(t.Key) != 1 {
		return false
	}
	switch t.Key[0].Type {
	case "smallint", "integer", "bigint", "numeric", "text", "date":
		return true
	}
	return strings.HasPrefix(t.Key[0].Type, "character varying") || strings.HasPrefix(t.Key[0].Type, "timestamp")
}

// lastKey is the highest key of _cdcb_keys as a text[].
func (t *Table) lastKey() string {
	if t.maxable() {
		// HAVING: no row (NULL) for an empty batch, not ARRAY[NULL].
		return "(SELECT ARRAY[max(_cdcb_k0)::text] FROM _cdcb_keys HAVING count(*) > 0)"
	}
	return fmt.Sprintf("(SELECT ARRAY[%s] FROM _cdcb_keys ORDER BY %s LIMIT 1)", t.slots("", "::text"), t.descSlots())
}

// RangeSQL recomputes the first $limit rows after lo up to hi.
func (t *Table) RangeSQL(withLow bool) string {
	keys, low := t.rangeKeys(withLow, "")
	// The rows to lock are the key range the batch covers, found by an index
	// range scan rather than a semi-join against the key list.
	filter := fmt.Sprintf("ROW(%s) <= %s", t.keyList(), t.lastSlots(""))
	if low != "" {
		filter = low + " AND " + filter
	}
	return keys + t.lockAndUpdate(filter) + fmt.Sprintf(`
SELECT (SELECT count(*) FROM _cdcb_keys), (SELECT count(*) FROM _cdcb_upd), %s, s.key
FROM (SELECT 1) AS _cdcb_one LEFT JOIN _cdcb_skipped s ON true`, t.lastKey())
}

func (t *Table) descSlots() string {
	desc := make([]string, len(t.Key))
	for i := range t.Key {
		desc[i] = fmt.Sprintf("_cdcb_k%d DESC", i)
	}
	return strings.Join(desc, ", ")
}

// rangeArgs builds the parameters of a range statement.
func rangeArgs(lo, hi Key, limit int) []any {
	var args []any
	for _, v := range lo {
		args = append(args, v)
	}
	for _, v := range hi {
		args = append(args, v)
	}
	return append(args, limit)
}

// Range recomputes up to limit rows with keys after lo (nil: from the start)
// up to hi inclusive, in key order.
func (t *Table) Range(ctx context.Context, q Querier, lo, hi Key, limit int) (Result, error) {
	rows, err := q.Query(ctx, t.RangeSQL(lo != nil), rangeArgs(lo, hi, limit)...)
	if err != nil {
		return Result{}, err
	}
	defer rows.Close()
	var res Result
	for rows.Next() {
		var skipped []string
		if err := rows.Scan(&res.Scanned, &res.Corrected, &res.Last, &skipped); err != nil {
			return Result{}, err
		}
		if skipped != nil {
			res.Skipped = append(res.Skipped, skipped)
		}
	}
	return res, rows.Err()
}

// CheckSQL reads (never writes, never locks) up to $limit rows after lo up to
// hi and reports those out of parity.
func (t *Table) CheckSQL(withLow bool) string {
	keys, _ := t.rangeKeys(withLow, ", "+t.failsCheck()+" AS _cdcb_bad")
	return keys + fmt.Sprintf(`
SELECT (SELECT count(*) FROM _cdcb_keys), %s, m.key
FROM (SELECT 1) AS _cdcb_one
LEFT JOIN (SELECT ARRAY[%s] AS key FROM _cdcb_keys WHERE _cdcb_bad) m ON true`, t.lastKey(), t.slots("", "::text"))
}

// Check reports, for up to limit rows after lo up to hi, the keys whose new
// columns differ from their expressions. Result.Skipped holds them.
func (t *Table) Check(ctx context.Context, q Querier, lo, hi Key, limit int) (Result, error) {
	rows, err := q.Query(ctx, t.CheckSQL(lo != nil), rangeArgs(lo, hi, limit)...)
	if err != nil {
		return Result{}, err
	}
	defer rows.Close()
	var res Result
	for rows.Next() {
		var bad []string
		if err := rows.Scan(&res.Scanned, &res.Last, &bad); err != nil {
			return Result{}, err
		}
		if bad != nil {
			res.Skipped = append(res.Skipped, bad)
		}
	}
	return res, rows.Err()
}

// Bounds reads the lowest and highest key and the estimated row count.
func (t *Table) Bounds(ctx context.Context, q Querier) (lo, hi Key, estimate int64, err error) {
	asc := fmt.Sprintf("SELECT ARRAY[%s] FROM %s ORDER BY %s LIMIT 1", t.textKeys(), t.Ident(), t.keyList())
	if err = q.QueryRow(ctx, asc).Scan(&lo); err != nil && err != pgx.ErrNoRows {
		return nil, nil, 0, fmt.Errorf("read lowest key of %s: %w", t.Ident(), err)
	}
	if hi, err = t.HighestKey(ctx, q); err != nil {
		return nil, nil, 0, err
	}
	err = q.QueryRow(ctx, `SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::regclass`, t.Ident()).Scan(&estimate)
	if err != nil {
		return nil, nil, 0, fmt.Errorf("estimate rows of %s: %w", t.Ident(), err)
	}
	return lo, hi, estimate, nil
}

// CountAfter counts up to limit rows with keys after after (nil: from the
// first), in key order, and returns the count and the last key counted: one
// chunk of a count that never scans the whole table in one statement.
func (t *Table) CountAfter(ctx context.Context, q Querier, after Key, limit int) (int64, Key, error) {
	where := "true"
	args := []any{limit}
	if after != nil {
		where = fmt.Sprintf("ROW(%s) > ROW(%s)", t.keyList(), t.keyParams(2))
		args = append(args, keyArgs(after)...)
	}
	sql := fmt.Sprintf(`WITH _cdcb_keys AS (SELECT %s FROM %s WHERE %s ORDER BY %s LIMIT $1)
SELECT (SELECT count(*) FROM _cdcb_keys), %s`, t.selectSlots(), t.Ident(), where, t.keyList(), t.lastKey())
	var n int64
	var last Key
	if err := q.QueryRow(ctx, sql, args...).Scan(&n, &last); err != nil {
		return 0, nil, fmt.Errorf("count rows of %s: %w", t.Ident(), err)
	}
	return n, last, nil
}

func (t *Table) textKeys() string {
	parts := make([]string, len(t.Key))
	for i, k := range t.Key {
		parts[i] = t.Ident() + "." + pgx.Identifier{k.Name}.Sanitize() + "::text"
	}
	return strings.Join(parts, ", ")
}

func (t *Table) keyListDesc() string {
	parts := make([]string, len(t.Key))
	for i, k := range t.Key {
		parts[i] = t.Ident() + "." + pgx.Identifier{k.Name}.Sanitize() + " DESC"
	}
	return strings.Join(parts, ", ")
}

// FindFailingRow looks, among up to limit rows after lo up to hi, for the
// first row whose recompute fails, and the column whose expression fails.
// Each try runs in a subtransaction that is rolled back: nothing is written.
func (t *Table) FindFailingRow(ctx context.Context, conn *pgx.Conn, lo, hi Key, limit int) (Key, string, error) {
	keys, _ := t.rangeKeys(lo != nil, "")
	rows, err := conn.Query(ctx, keys+fmt.Sprintf(" SELECT ARRAY[%s] FROM _cdcb_keys ORDER BY %s", t.slots("", "::text"), t.slots("", "")), rangeArgs(lo, hi, limit)...)
	if err != nil {
		return nil, "", err
	}
	candidates, err := pgx.CollectRows(rows, pgx.RowTo[[]string])
	if err != nil {
		return nil, "", err
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, "", err
	}
	defer tx.Rollback(context.Background())
	for _, k := range candidates {
		for _, c := range t.Columns {
			one := &Table{Schema: t.Schema, Name: t.Name, Key: t.Key, Columns: []Column{c}}
			sp, err := tx.Begin(ctx)
			if err != nil {
				return nil, "", err
			}
			_, err = one.Keys(ctx, sp, []Key{k})
			sp.Rollback(ctx)
			if err != nil {
				return k, c.Name, nil
			}
		}
	}
	return nil, "", nil
}

// FastRange is Range without the row locks taken ahead: one UPDATE of the
// batch's key range where out of parity. Run it under a short lock_timeout:
// when the application holds a row of the range, it fails with 55P03 (the
// caller then runs Range, which passes over held rows) instead of waiting;
// the rows it has locked so far are released at once. It never returns
// skipped keys.
//
// Two statements: the batch's end is the limit-th key after lo, found by an
// index-only scan (OFFSET), or hi when fewer keys remain; a plain UPDATE
// then walks that key range and its command tag gives the rows written, so
// nothing is materialized to count them. Only the last batch counts its rows.
func (t *Table) FastRange(ctx context.Context, q Querier, lo, hi Key, limit int) (Result, error) {
	res := Result{Scanned: int64(limit)}
	err := q.QueryRow(ctx, t.fastEndSQL(lo != nil), rangeArgs(lo, hi, limit)...).Scan(&res.Last)
	if errors.Is(err, pgx.ErrNoRows) {
		// Fewer than limit keys remain: the batch runs to hi.
		res.Last = hi
		err = q.QueryRow(ctx, t.fastCountSQL(lo != nil), append(keyArgs(lo), keyArgs(hi)...)...).Scan(&res.Scanned)
	}
	if err != nil {
		return res, err
	}
	tag, err := q.Exec(ctx, t.fastUpdateSQL(lo != nil), append(keyArgs(lo), keyArgs(res.Last)...)...)
	if err != nil {
		return res, err
	}
	res.Corrected = tag.RowsAffected()
	return res, nil
}

// fastRange is the condition "after $lo (when withLow) up to $hi" and the
// number of the next free parameter.
func (t *Table) fastRange(withLow bool) (string, int) {
	n := len(t.Key)
	cond := ""
	next := 1
	if withLow {
		cond = fmt.Sprintf("ROW(%s) > ROW(%s) AND ", t.keyList(), t.keyParams(next))
		next += n
	}
	cond += fmt.Sprintf("ROW(%s) <= ROW(%s)", t.keyList(), t.keyParams(next))
	return cond, next + n
}

// fastEndSQL selects the $limit-th key of the range as a text[]; no row
// when fewer remain.
func (t *Table) fastEndSQL(withLow bool) string {
	cond, next := t.fastRange(withLow)
	return fmt.Sprintf("SELECT ARRAY[%s] FROM %s WHERE %s ORDER BY %s OFFSET $%d - 1 LIMIT 1",
		t.textKeys(), t.Ident(), cond, t.keyList(), next)
}

// fastCountSQL counts the keys of the range (the last batch only).
func (t *Table) fastCountSQL(withLow bool) string {
	cond, _ := t.fastRange(withLow)
	return fmt.Sprintf("SELECT count(*) FROM %s WHERE %s", t.Ident(), cond)
}

// fastUpdateSQL recomputes the rows of the range that are out of parity.
func (t *Table) fastUpdateSQL(withLow bool) string {
	cond, _ := t.fastRange(withLow)
	return fmt.Sprintf("UPDATE %s SET %s WHERE %s AND %s", t.Ident(), t.setList(), cond, t.outOfParity())
}

func keyArgs(k Key) []any {
	args := make([]any, len(k))
	for i, v := range k {
		args[i] = v
	}
	return args
}

// keyLabel is "(k1, k2)", as KeyString writes it.
func (t *Table) keyLabel() string { return "(" + strings.Join(t.KeyNames(), ", ") + ")" }

// HighestKey reads the highest key (nil for an empty table).
func (t *Table) HighestKey(ctx context.Context, q Querier) (Key, error) {
	var hi Key
	desc := fmt.Sprintf("SELECT ARRAY[%s] FROM %s ORDER BY %s LIMIT 1", t.textKeys(), t.Ident(), t.keyListDesc())
	if err := q.QueryRow(ctx, desc).Scan(&hi); err != nil && err != pgx.ErrNoRows {
		return nil, fmt.Errorf("read highest key of %s: %w", t.Ident(), err)
	}
	return hi, nil
}

// Mismatch is a row whose new columns differ from their expressions: the
// values it holds and the values the expressions give, as text (nil for
// NULL), in the order of Table.Columns.
type Mismatch struct {
	Key      Key
	Actual   []*string
	Expected []*string
}

// checkKeysSQL reads, never writes or locks, the rows of the given keys
// (parameters: see keysCTE) that are out of parity, with both values.
func (t *Table) checkKeysSQL() string {
	cte, keysIn := t.keysCTE()
	actual := make([]string, len(t.Columns))
	expected := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		actual[i] = pgx.Identifier{c.Name}.Sanitize() + "::text"
		expected[i] = "(" + c.Expr + ")::text"
	}
	return cte + fmt.Sprintf(`
SELECT ARRAY[%s], ARRAY[%s], ARRAY[%s] FROM %s WHERE %s AND %s`,
		t.textKeys(), strings.Join(actual, ", "), strings.Join(expected, ", "), t.Ident(), keysIn, t.failsCheck())
}

// InParity returns the keys of checked that CheckKeys did not find out of
// parity (found), in their order.
func InParity(checked []Key, found []Mismatch) []Key {
	bad := make(map[string]bool, len(found))
	for _, m := range found {
		bad[m.Key.ID()] = true
	}
	var clean []Key
	for _, k := range checked {
		if !bad[k.ID()] {
			clean = append(clean, k)
		}
	}
	return clean
}

// CheckKeys reports which of keys are out of parity, with both values. It
// only reads: where the application owns the new columns the daemon reports,
// it never writes. Missing rows are ignored.
func (t *Table) CheckKeys(ctx context.Context, q Querier, keys []Key) ([]Mismatch, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	rows, err := q.Query(ctx, t.checkKeysSQL(), keyColumns(t, keys)...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Mismatch, error) {
		var m Mismatch
		var key []string
		err := r.Scan(&key, &m.Actual, &m.Expected)
		m.Key = key
		return m, err
	})
}

// guardedSQL recomputes the rows of the given keys (parameters: see
// keysCTE, then one xid per key) only where the row is still the version
// that transaction wrote (its xmin): a row changed since, by a transaction
// the stream has not delivered yet, is left alone.
func (t *Table) guardedSQL() string {
	n := len(t.Key)
	unnest := make([]string, n+1)
	casts := make([]string, n)
	for i, k := range t.Key {
		unnest[i] = fmt.Sprintf("$%d::text[]", i+1)
		casts[i] = fmt.Sprintf("_cdcb_k%d::%s AS _cdcb_k%d", i, k.Type, i)
	}
	unnest[n] = fmt.Sprintf("$%d::text[]", n+1)
	return fmt.Sprintf(`WITH _cdcb_keys AS (
	SELECT %s, _cdcb_x::xid AS _cdcb_x FROM unnest(%s) AS u(%s, _cdcb_x)
),
_cdcb_upd AS (
	UPDATE %s SET %s FROM _cdcb_keys k
	WHERE ROW(%s) = ROW(%s) AND %s.xmin = k._cdcb_x AND %s
	RETURNING 1
)
SELECT count(*) FROM _cdcb_upd`,
		strings.Join(casts, ", "), strings.Join(unnest, ", "), t.slots("", ""),
		t.Ident(), t.setList(), t.keyList(), t.slots("k.", ""), t.Ident(), t.outOfParity())
}

// KeysGuarded recomputes keys[i] only where its row's current version is
// the one transaction xids[i] wrote, and returns how many rows it wrote. It
// serves the hand-over of the new columns to the application: a change made
// before the hand-over is still the expression's to correct, unless the
// application has changed the row again since.
func (t *Table) KeysGuarded(ctx context.Context, q Querier, keys []Key, xids []uint32) (int64, error) {
	if len(keys) == 0 {
		return 0, nil
	}
	args := keyColumns(t, keys)
	xs := make([]string, len(xids))
	for i, x := range xids {
		xs[i] = fmt.Sprint(x)
	}
	var n int64
	err := q.QueryRow(ctx, t.guardedSQL(), append(args, xs)...).Scan(&n)
	return n, err
}
