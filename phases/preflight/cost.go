package preflight

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// The WAL a backfill writes, per row and per page, as pg_waldump --stats
// shows it for the running example (PostgreSQL 15, 100k and 1M rows, one
// UPDATE of every row of a frozen table, which writes what the backfill's
// batches write): each row moves to another page (the table was loaded
// full), so an update writes
//   - Heap/UPDATE: 73 bytes of headers and the new tuple's data (+1),
//   - Heap/LOCK: 54 bytes (the old tuple is locked while the new page is
//     found),
//   - Btree/INSERT_LEAF for each index: 48 bytes and the index tuple;
//
// each index page splits once as it takes a second entry per key (SPLIT_L,
// DEDUP, INSERT_UPPER: 0.56 of a page per index page); and with
// full_page_writes each heap and index page is written whole once (the
// backfill walks the key, so it touches each page in one batch, whatever
// the checkpoints). Records are 8-byte aligned. The model gave 27.67 MB
// and 284.7 MB against 27.73 and 284.6 measured (full_page_writes off),
// and the full pages 9.7 MB and 104 MB (12958 of them at 1M rows, heap
// plus index pages). An update that stays on its page (HOT: fillfactor
// below 100) writes no lock and no index entry: the estimate is then an
// upper bound.
const (
	walUpdateHeader = 74 // Heap/UPDATE without the tuple's data
	walLockRecord   = 56 // Heap/LOCK, aligned
	walIndexHeader  = 48 // Btree/INSERT_LEAF without the index tuple
	walSplitShare   = 0.56
	indexFill       = 0.9 // a B-tree leaf's default fillfactor: its full-page image leaves out the hole
)

// The uncapped pace comes from a read-only sample and the WAL estimate.
// plan reads the first samplePaceRows rows in key order, as the backfill
// walks them, once as they are and once with the new columns' expressions
// computed (EXPLAIN ANALYZE: the server's own time, no network). A batch
// then costs per row
//
//	the read + 2 x the expressions (the UPDATE computes them for its SET
//	and again to pass over rows in parity) + WALByteCost x its WAL records
//
// and backfill.sleep after each batch, whose size is 2/3 of
// target_batch_time at that cost (the Sizer's aim). The write's cost is
// per byte of WAL: the new row version, its index entries, the lock of the
// old one, and the walsender decoding them; WALByteCost is what make
// bench-long measured (it prints what each run implies). Multiplying the
// read instead (a write costs 20 reads) fitted 1M rows and missed 10M by
// 1.8x: the first rows of a table larger than shared buffers read slower
// than the walk goes. Workers beyond the first are not counted: on free
// cores they go faster.
const samplePaceRows = 20000

// WALByteCost is the write's cost per byte of a row's WAL records, in ns
// (see above); exported for make bench-long.
const WALByteCost = 16.0

// BackfillCost is what plan says the backfill will cost, before it starts.
type BackfillCost struct {
	Rows          int64
	RowBytes      int64   // WAL per row: records
	PageBytes     int64   // WAL for the pages: full-page images and index splits
	WALBytes      int64   // the whole estimate
	RowsPerSecond float64 // the pace of Duration
	Pace          string  // where RowsPerSecond comes from
	Duration      time.Duration
	// The read-only sample of the uncapped pace: per row, reading it in key
	// order, and computing the new columns' expressions on top.
	SampleRead, SampleExprs time.Duration
	SampleRows              int64
	// What the estimate rests on, for the operator.
	HeapPages, IndexPages int64
	Indexes               int
	FullPageWrites        bool
	Correlation           float64 // of the key's first column with the heap's order (pg_stats); 1 when unknown
}

const costCatalogSQL = `SELECT GREATEST(c.reltuples, 0)::float8, c.relpages::int8,
  (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid)::int,
  (SELECT coalesce(sum(ic.relpages), 0) FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid)::int8,
  current_setting('full_page_writes') = 'on', current_setting('block_size')::int
FROM pg_class c WHERE c.oid = $1::regclass`

// columnWidthsSQL: pg_stats' average width of each column, by name.
const columnWidthsSQL = `SELECT attname::text, avg_width, coalesce(correlation, 1)::float8 FROM pg_stats WHERE schemaname = $1 AND tablename = $2`

// indexWidthsSQL: the columns of each index (0 for an expression).
const indexWidthsSQL = `SELECT i.indexrelid, coalesce(a.attname::text, '') FROM pg_index i
  CROSS JOIN LATERAL unnest(i.indkey) AS k(attnum)
  LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
  WHERE i.indrelid = $1::regclass ORDER BY 1`

// EstimateBackfillCost estimates, from the catalog, the WAL the backfill
// of t writes and how long it takes at cfg's pace. The new columns' width
// comes from the expressions over a read-only sample of rows (they may
// not exist yet); the others' from pg_stats.
func EstimateBackfillCost(ctx context.Context, conn *pgx.Conn, cfg *config.Config, t *recompute.Table) (BackfillCost, error) {
	var c BackfillCost
	var reltuples float64
	var blockSize int64
	if err := conn.QueryRow(ctx, costCatalogSQL, t.Ident()).Scan(&reltuples, &c.HeapPages, &c.Indexes, &c.IndexPages, &c.FullPageWrites, &blockSize); err != nil {
		return c, fmt.Errorf("read the catalog of %s: %w", t.Ident(), err)
	}
	c.Rows = int64(reltuples)
	widths := map[string]int64{}
	c.Correlation = 1
	rows, err := conn.Query(ctx, columnWidthsSQL, t.Schema, t.Name)
	if err != nil {
		return c, fmt.Errorf("read pg_stats of %s: %w", t.Ident(), err)
	}
	var name string
	var width int64
	var corr float64
	_, err = pgx.ForEachRow(rows, []any{&name, &width, &corr}, func() error {
		widths[name] = width
		if len(t.Key) > 0 && name == t.Key[0].Name {
			c.Correlation = corr
		}
		return nil
	})
	if err != nil {
		return c, fmt.Errorf("read pg_stats of %s: %w", t.Ident(), err)
	}
	newCols := map[string]bool{}
	for _, col := range t.Columns {
		newCols[col.Name] = true
	}
	var data int64 // bytes of a row's data after the backfill
	for col, w := range widths {
		if !newCols[col] {
			data += w
		}
	}
	if len(widths) == 0 && c.Rows > 0 { // never analyzed: what the heap holds per row
		data = max(c.HeapPages*blockSize/c.Rows-28, 8)
	}
	newWidth, err := sampleWidth(ctx, conn, t)
	if err != nil {
		return c, err
	}
	data += newWidth

	idx, err := indexTupleBytes(ctx, conn, t, widths)
	if err != nil {
		return c, err
	}
	c.RowBytes = align8(walUpdateHeader+data) + walLockRecord
	for _, tuple := range idx {
		c.RowBytes += align8(walIndexHeader + tuple)
	}
	c.PageBytes = int64(walSplitShare * float64(c.IndexPages*blockSize))
	if c.FullPageWrites {
		c.PageBytes += c.HeapPages*blockSize + int64(indexFill*float64(c.IndexPages*blockSize))
	}
	c.WALBytes = c.Rows*c.RowBytes + c.PageBytes

	if err := c.samplePace(ctx, conn, cfg, t); err != nil {
		return c, err
	}
	if m := cfg.Backfill.MaxRowsPerSecond; m > 0 && m < c.RowsPerSecond {
		c.RowsPerSecond, c.Pace = m, "backfill.max_rows_per_second"
	}
	c.Duration = time.Duration(float64(c.Rows) / c.RowsPerSecond * float64(time.Second))
	return c, nil
}

// samplePace sets the uncapped pace from a read-only sample of t (see
// WALByteCost): the best of three reads of the first rows in key
// order, without and with the expressions.
func (c *BackfillCost) samplePace(ctx context.Context, conn *pgx.Conn, cfg *config.Config, t *recompute.Table) error {
	order := make([]string, len(t.Key))
	for i, k := range t.Key {
		order[i] = pgx.Identifier{k.Name}.Sanitize()
	}
	exprs := make([]string, len(t.Columns))
	for i, col := range t.Columns {
		exprs[i] = fmt.Sprintf("(%s) AS _cdcb_e%d", col.Expr, i)
	}
	// count(s.*) needs every column of the row (a heap fetch, not an
	// index-only scan), and with exprs the expressions' values too.
	sample := func(extra string) string {
		return fmt.Sprintf("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) SELECT count(s.*) FROM (SELECT *%s FROM %s ORDER BY %s LIMIT %d) s",
			extra, t.Ident(), strings.Join(order, ", "), samplePaceRows)
	}
	read, rows, err := bestOf3(ctx, conn, sample(""))
	if err != nil {
		return fmt.Errorf("sample the pace (read %d rows in key order): %w", samplePaceRows, err)
	}
	withExprs := read
	if len(exprs) > 0 {
		if withExprs, _, err = bestOf3(ctx, conn, sample(", "+strings.Join(exprs, ", "))); err != nil {
			return fmt.Errorf("sample the pace (the expressions over %d rows): %w", samplePaceRows, err)
		}
	}
	c.SampleRows = rows
	if rows == 0 {
		c.RowsPerSecond, c.Pace = 1e6, "uncapped: the table is empty, nothing to sample"
		return nil
	}
	c.SampleRead = read / time.Duration(rows)
	c.SampleExprs = max(withExprs-read, 0) / time.Duration(rows)
	perRow := float64(c.SampledPerRow()) + WALByteCost*float64(c.RowBytes) // ns
	batchRows := max(float64(cfg.Backfill.TargetBatchTime)*2/3/perRow, 1)
	if cfg.Backfill.TargetBatchTime <= 0 {
		batchRows = float64(max(cfg.Backfill.BatchSize, 1))
	}
	perRow += float64(cfg.Backfill.Sleep) / batchRows
	c.RowsPerSecond = 1e9 / perRow
	c.Pace = fmt.Sprintf("uncapped, from a read-only sample of %d rows in key order: %.2f µs a row to read, %.2f to compute the expressions (twice a row), %.2f to write its %d bytes of WAL, backfill.sleep %s a batch of about %.0f rows; workers 1",
		rows, us(c.SampleRead), us(c.SampleExprs), WALByteCost*float64(c.RowBytes)/1000, c.RowBytes, cfg.Backfill.Sleep, batchRows)
	return nil
}

// SampledPerRow is what the sample says a row costs besides its write:
// the read and twice the expressions (see WALByteCost).
func (c BackfillCost) SampledPerRow() time.Duration { return c.SampleRead + 2*c.SampleExprs }

// bestOf3 runs an EXPLAIN ANALYZE three times and returns its fastest
// execution time and the rows its top node returned from below (the
// sample's size).
func bestOf3(ctx context.Context, conn *pgx.Conn, explain string) (time.Duration, int64, error) {
	best := time.Duration(math.MaxInt64)
	var rows int64
	for range 3 {
		var plan []struct {
			Plan struct {
				Plans []struct {
					Rows float64 `json:"Actual Rows"`
				} `json:"Plans"`
			} `json:"Plan"`
			Took float64 `json:"Execution Time"` // ms
		}
		if err := conn.QueryRow(ctx, explain).Scan(&plan); err != nil {
			return 0, 0, err
		}
		if len(plan) != 1 {
			return 0, 0, fmt.Errorf("EXPLAIN gave %d plans", len(plan))
		}
		best = min(best, time.Duration(plan[0].Took*float64(time.Millisecond)))
		if p := plan[0].Plan.Plans; len(p) > 0 {
			rows = int64(p[0].Rows)
		}
	}
	return best, rows, nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// sampleWidth is the average width of the new columns' values, computed
// by their expressions over the first 1000 rows (read only; nothing is
// written).
func sampleWidth(ctx context.Context, conn *pgx.Conn, t *recompute.Table) (int64, error) {
	if len(t.Columns) == 0 {
		return 0, nil
	}
	sizes := make([]string, len(t.Columns))
	for i, col := range t.Columns {
		sizes[i] = "coalesce(pg_column_size(" + col.Expr + "), 0)"
	}
	sql := "SELECT coalesce(avg(" + strings.Join(sizes, " + ") + "), 0)::float8 FROM (SELECT * FROM " + t.Ident() + " LIMIT 1000) s"
	var w float64
	if err := conn.QueryRow(ctx, sql).Scan(&w); err != nil {
		return 0, fmt.Errorf("sample the new columns' width: %w", err)
	}
	return int64(math.Round(w)), nil
}

// indexTupleBytes is, for each index of t, the size of one of its tuples:
// 8 bytes of header and the key's columns (8 for an expression).
func indexTupleBytes(ctx context.Context, conn *pgx.Conn, t *recompute.Table, widths map[string]int64) ([]int64, error) {
	rows, err := conn.Query(ctx, indexWidthsSQL, t.Ident())
	if err != nil {
		return nil, fmt.Errorf("read the indexes of %s: %w", t.Ident(), err)
	}
	var oid uint32
	var col string
	key := map[uint32]int64{}
	var order []uint32
	_, err = pgx.ForEachRow(rows, []any{&oid, &col}, func() error {
		if _, ok := key[oid]; !ok {
			order = append(order, oid)
		}
		w, ok := widths[col]
		if !ok {
			w = 8
		}
		key[oid] += w
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read the indexes of %s: %w", t.Ident(), err)
	}
	out := make([]int64, len(order))
	for i, o := range order {
		out[i] = 8 + align8(key[o])
	}
	return out, nil
}

func align8(n int64) int64 { return (n + 7) &^ 7 }

// checkCost says what the backfill will cost before it starts: the WAL it
// writes and how long it takes, next to the room the WAL has (the disk,
// max_slot_wal_keep_size, the daemon's slot lag bound) and the standbys it
// must reach too. It changes nothing; it warns, never fails.
func checkCost(ctx context.Context, in *inspection) (bool, error) {
	r, cfg := in.r, in.cfg
	if st := in.r.State; st != nil && st.Phase != state.Expand && st.Phase != state.Backfill {
		r.info("backfill cost", "the backfill is done (phase "+string(st.Phase)+")", "")
		return false, nil
	}
	c, err := EstimateBackfillCost(ctx, in.conn, cfg, in.table)
	if err != nil {
		r.warn("backfill cost", "cannot estimate: "+err.Error(), "ANALYZE "+in.table.Ident())
		return false, nil
	}
	hold := "the slot holds at most " + sizeText(cfg.Throttle.MaxSlotLag) + " (throttle.max_slot_lag)"
	bound := cfg.Throttle.MaxSlotLag // the most WAL the daemon's slot keeps
	if bound == 0 {
		hold, bound = "the slot may hold all of it (throttle.max_slot_lag 0: no cap)", c.WALBytes
	}
	r.info("backfill", fmt.Sprintf("about %s of WAL over about %s at %s rows/s; %s", sizeText(c.WALBytes), durationText(c.Duration), rateText(c.RowsPerSecond), hold), "")
	basis := fmt.Sprintf("%d rows x %d bytes, and %s for %d heap and %d index pages (%d index(es)", c.Rows, c.RowBytes, sizeText(c.PageBytes), c.HeapPages, c.IndexPages, c.Indexes)
	if c.FullPageWrites {
		basis += "; a full-page image of each"
	}
	basis += "); pace: " + c.Pace
	if c.Correlation < 0.9 && c.Correlation > -0.9 {
		basis += fmt.Sprintf("; the key does not follow the heap's order (correlation %.2f): each checkpoint during the backfill writes the pages it touches whole again, so expect more", c.Correlation)
	}
	r.info("backfill WAL estimate", basis, "")

	// One round trip; data_directory is NULL for a role that may not see it.
	var maxWAL, keepBytes int64
	var keep string
	var dataDir *string
	if err := in.conn.QueryRow(ctx, `SELECT pg_size_bytes(current_setting('max_wal_size')),
		current_setting('max_slot_wal_keep_size'), pg_size_bytes(current_setting('max_slot_wal_keep_size')),
		(SELECT setting FROM pg_settings WHERE name = 'data_directory')`).Scan(&maxWAL, &keep, &keepBytes, &dataDir); err != nil {
		return false, fmt.Errorf("read max_wal_size, max_slot_wal_keep_size and data_directory: %w", err)
	}
	walRoom(in, dataDir, bound+maxWAL)
	slotKeep(in, keep, keepBytes, bound)
	standbys, err := snapshot.Standbys(ctx, in.conn, cfg.Throttle.IgnoreSlots)
	if err != nil {
		r.warn("backfill WAL", err.Error(), "")
		return false, nil
	}
	if len(standbys) == 0 {
		r.info("backfill WAL", "no physical standby must receive it", "")
	} else {
		names := make([]string, len(standbys))
		for i, s := range standbys {
			names[i] = s.Label()
		}
		r.info("backfill WAL", fmt.Sprintf("%d standbys must receive it too (%s)", len(standbys), strings.Join(names, ", ")), "")
	}
	return false, nil
}

// walRoom says how much room pg_wal has, when the server's data directory
// (nil: hidden from this role) is visible from this host; need is what the
// slot and the checkpoints may keep (the slot's bound and max_wal_size).
func walRoom(in *inspection, dataDir *string, need int64) {
	if dataDir == nil || *dataDir == "" {
		in.r.info("WAL room", "the server's data directory is hidden from this role (pg_read_all_settings): its free room cannot be seen from here", "")
		return
	}
	path := filepath.Join(*dataDir, "pg_wal")
	var fs syscall.Statfs_t
	if err := syscall.Statfs(path, &fs); err != nil {
		in.r.info("WAL room", fmt.Sprintf("%s cannot be seen from here (%v): the server's free WAL room is unknown", path, err), "")
		return
	}
	free := int64(fs.Bavail) * int64(fs.Bsize)
	if free < need {
		in.r.warn("WAL room", fmt.Sprintf("%s on this host has %s free, less than the %s the slot and max_wal_size may keep", path, sizeText(free), sizeText(need)),
			"free disk space, or lower throttle.max_slot_lag")
		return
	}
	in.r.info("WAL room", fmt.Sprintf("%s on this host has %s free (the slot and max_wal_size may keep %s)", path, sizeText(free), sizeText(need)), "")
}

// slotKeep compares max_slot_wal_keep_size (keep, keepBytes: -1 for no
// limit) with what the slot may hold: a server that invalidates the slot
// first ends the migration (a new slot and a fresh backfill).
func slotKeep(in *inspection, keep string, keepBytes, bound int64) {
	if keepBytes < 0 {
		return // unlimited: checkReplication warns of it
	}
	if keepBytes < bound {
		in.r.warn("max_slot_wal_keep_size", fmt.Sprintf("%s: the server invalidates the slot once it holds more, before the daemon's bound of %s", keep, sizeText(bound)),
			"set throttle.max_slot_lag below max_slot_wal_keep_size, or raise max_slot_wal_keep_size")
		return
	}
	in.r.info("max_slot_wal_keep_size", fmt.Sprintf("%s: above the daemon's bound of %s", keep, sizeText(bound)), "")
}

// sizeText writes bytes as "4.3 GB", "512 MB", "12 kB".
func sizeText(n int64) string {
	units := []string{"bytes", "kB", "MB", "GB", "TB"}
	v, i := float64(n), 0
	for ; v >= 1024 && i < len(units)-1; i++ {
		v /= 1024
	}
	if v < 10 && i > 0 {
		return fmt.Sprintf("%.1f %s", v, units[i])
	}
	return fmt.Sprintf("%.0f %s", v, units[i])
}

// durationText writes d as "45 s", "12 min", "1 h 20 m".
func durationText(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%d s", max(int(d.Round(time.Second).Seconds()), 1))
	case d < time.Hour:
		return fmt.Sprintf("%d min", int(d.Round(time.Minute).Minutes()))
	}
	d = d.Round(time.Minute)
	return fmt.Sprintf("%d h %d m", int(d.Hours()), int(d.Minutes())%60)
}

// rateText writes a rate as "40k", "1.2M", "500".
func rateText(r float64) string {
	switch {
	case r >= 1e6:
		return fmt.Sprintf("%.1fM", r/1e6)
	case r >= 1e4:
		return fmt.Sprintf("%.0fk", r/1e3)
	case r >= 1e3:
		return fmt.Sprintf("%.1fk", r/1e3)
	}
	return fmt.Sprintf("%.0f", r)
}
