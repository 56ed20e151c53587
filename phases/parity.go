package phases

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/internal/repeatlog"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// paritySink keeps what the applier and verify find while the application
// owns the new columns (applier.Checks): a row out of parity is kept in the
// store, with both values, until a check finds it in parity again; it is
// never overwritten.
type paritySink struct {
	store state.Store
	pool  *pgxpool.Pool // Report is called from the applier's goroutine
	table *recompute.Table
	// detect is dual_write.detect: with auto, a row out of parity proves
	// the detection premature.
	detect config.Detect
	rlog   *repeatlog.Log

	found atomic.Uint64 // rows found out of parity by this daemon (stream and verify)
	// kept is how many rows the store may hold; while 0 a clean key cannot
	// clear anything and no statement is spent on it.
	kept atomic.Int64
}

func newParitySink(store state.Store, pool *pgxpool.Pool, table *recompute.Table, detect config.Detect, rlog *repeatlog.Log) *paritySink {
	return &paritySink{store: store, pool: pool, table: table, detect: detect, rlog: rlog}
}

func (p *paritySink) Report(ctx context.Context, found []recompute.Mismatch, clean []recompute.Key) error {
	if len(found) > 0 {
		if err := p.store.RecordMismatches(ctx, p.pool, found); err != nil {
			return err
		}
		p.found.Add(uint64(len(found)))
		p.kept.Add(int64(len(found)))
		for _, m := range found[:min(len(found), 3)] {
			if p.detect == config.DetectAuto {
				p.rlog.Warn("dual-write detection was premature: a row changed after it needs a correction; back to sync",
					"key", p.table.KeyString(m.Key), "values", describeMismatch(p.table, m))
			} else {
				p.rlog.Warn("row out of parity: the application wrote new columns that differ from their expressions; "+
					"they are kept as written and hold the contract until fixed, or accepted (cdcbackfill approve --accept-mismatches)",
					"key", p.table.KeyString(m.Key), "values", describeMismatch(p.table, m))
			}
		}
	}
	if len(clean) > 0 && p.kept.Load() > 0 {
		n, err := p.store.ClearMismatches(ctx, p.pool, clean)
		if err != nil {
			return err
		}
		p.kept.Add(-n)
	}
	return nil
}

// recheckKept checks again, read-only, the rows the store keeps (up to a
// bound per call): those the application has fixed or deleted leave it. It
// returns the number of rows out of parity not accepted.
func (p *paritySink) recheckKept(ctx context.Context, conn *pgx.Conn) (int64, error) {
	keys, err := p.store.MismatchKeys(ctx, conn, 1000)
	if err != nil {
		return 0, err
	}
	p.kept.Store(int64(len(keys)))
	if len(keys) > 0 {
		found, err := p.table.CheckKeys(ctx, conn, keys)
		if err != nil {
			return 0, fmt.Errorf("check the rows kept out of parity: %w", err)
		}
		clean := recompute.InParity(keys, found)
		if _, err := p.store.ClearMismatches(ctx, conn, clean); err != nil {
			return 0, err
		}
		p.kept.Add(-int64(len(clean)))
	}
	n, _, err := p.store.Outstanding(ctx, conn, 0)
	return n, err
}

// loadAndRecheck reads the state row and checks the rows kept out of
// parity again: what verify and contract look at on every tick.
func (d *Daemon) loadAndRecheck(ctx context.Context) (*state.Migration, int64, error) {
	st, err := d.store.Load(ctx, d.conn)
	if err != nil {
		return nil, 0, err
	}
	outstanding, err := d.parity.recheckKept(ctx, d.conn)
	return st, outstanding, err
}

// backToSync gives the new columns back to the expressions after an
// auto-detected dual-write proved premature: the rows found out of parity
// are corrected at once, later changes by the stream.
func (d *Daemon) backToSync(ctx context.Context, from state.Phase, outstanding int64) error {
	d.repl.setHandover(0)
	keys, err := d.store.MismatchKeys(ctx, d.conn, 100000)
	if err != nil {
		return err
	}
	for len(keys) > 0 {
		n := min(len(keys), 1000)
		if _, err := d.table.Keys(ctx, d.conn, keys[:n]); err != nil {
			return fmt.Errorf("correct the rows found out of parity: %w", err)
		}
		keys = keys[n:]
	}
	d.log.Warn("dual-write detection was premature: rows changed after it needed a correction; back to sync, where the expressions own the new columns again",
		"from", from, "rows", outstanding)
	return d.store.BackToSync(ctx, d.conn, from, map[string]any{"rows": outstanding, "reason": "premature dual-write detection"})
}
