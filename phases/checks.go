package phases

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// checkSink keeps what the applier finds while the application owns the
// new columns (applier.Checks): a row out of parity is kept in the store,
// with both values, until a check finds it in parity again; it is never
// overwritten.
type checkSink struct {
	d     *Daemon
	found atomic.Uint64 // rows found out of parity by this daemon (stream and verify)
	// kept is how many rows the store may hold; while 0 a clean key cannot
	// clear anything and no statement is spent on it.
	kept atomic.Int64
}

func (c *checkSink) Report(ctx context.Context, found []recompute.Mismatch, clean []recompute.Key) error {
	d := c.d
	if len(found) > 0 {
		if err := d.store.RecordMismatches(ctx, d.pool, found); err != nil {
			return err
		}
		c.found.Add(uint64(len(found)))
		c.kept.Add(int64(len(found)))
		for _, m := range found[:min(len(found), 3)] {
			if d.cfg.DualWrite.Detect == config.DetectAuto {
				d.rlog.Warn("dual-write detection was premature: a row changed after it needs a correction; back to sync",
					"key", d.table.KeyString(m.Key), "values", d.describe(m))
			} else {
				d.rlog.Warn("row out of parity: the application wrote new columns that differ from their expressions; "+
					"they are kept as written and hold the contract until fixed, or accepted (cdcbackfill approve --accept-mismatches)",
					"key", d.table.KeyString(m.Key), "values", d.describe(m))
			}
		}
	}
	if len(clean) > 0 && c.kept.Load() > 0 {
		n, err := d.store.ClearMismatches(ctx, d.pool, clean)
		if err != nil {
			return err
		}
		c.kept.Add(-n)
	}
	return nil
}

// recheckKept checks again, read-only, the rows the store keeps (up to a
// bound per call): those the application has fixed or deleted leave it. It
// returns the number of rows out of parity not accepted.
func (d *Daemon) recheckKept(ctx context.Context) (int64, error) {
	keys, err := d.store.MismatchKeys(ctx, d.conn, 1000)
	if err != nil {
		return 0, err
	}
	d.checks.kept.Store(int64(len(keys)))
	if len(keys) > 0 {
		found, err := d.table.CheckKeys(ctx, d.conn, keys)
		if err != nil {
			return 0, fmt.Errorf("check the rows kept out of parity: %w", err)
		}
		clean := recompute.InParity(keys, found)
		if _, err := d.store.ClearMismatches(ctx, d.conn, clean); err != nil {
			return 0, err
		}
		d.checks.kept.Add(-int64(len(clean)))
	}
	n, _, err := d.store.Outstanding(ctx, d.conn, 0)
	return n, err
}

// loadAndRecheck reads the state row and checks the rows kept out of
// parity again: what verify and contract look at on every tick.
func (d *Daemon) loadAndRecheck(ctx context.Context) (*state.Migration, int64, error) {
	st, err := d.store.Load(ctx, d.conn)
	if err != nil {
		return nil, 0, err
	}
	outstanding, err := d.recheckKept(ctx)
	return st, outstanding, err
}

// backToSync gives the new columns back to the expressions after an
// auto-detected dual-write proved premature: the rows found out of parity
// are corrected at once, later changes by the stream.
func (d *Daemon) backToSync(ctx context.Context, from state.Phase, outstanding int64) error {
	d.setHandover(0)
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
