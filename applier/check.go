package applier

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pglogrepl"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// handedOver is what correct returns when a gated statement found the
// hand-over recorded at lsn.
type handedOver struct{ lsn pglogrepl.LSN }

func (h *handedOver) Error() string { return "handed over at " + h.lsn.String() }

// checkAfterHandover is checkOwned once the buffer's transactions are
// visible.
func (a *Applier) checkAfterHandover(ctx context.Context, entries []*bufferedKey, unseen []uint32, h pglogrepl.LSN) (corrected int64, held int, err error) {
	if len(unseen) > 0 {
		if _, err := a.waitVisible(ctx, unseen); err != nil {
			return 0, 0, fmt.Errorf("apply keys: %w", err)
		}
	}
	return a.checkOwned(ctx, entries, h)
}

// checkOwned runs once the application owns the new columns from position h.
// A key whose latest change came before h is still the expression's: it is
// corrected, but only where the row is still the version that change wrote
// (KeysGuarded), so a newer change by the application, not delivered yet,
// is never overwritten. Every key is then checked, read-only, and the result
// reported to Config.Checks; nothing else is written.
func (a *Applier) checkOwned(ctx context.Context, entries []*bufferedKey, h pglogrepl.LSN) (corrected int64, held int, err error) {
	var before []*bufferedKey
	for _, p := range entries {
		if p.lastLSN < h {
			before = append(before, p)
		}
	}
	heldRows := map[*bufferedKey]bool{} // the application holds their rows: checked next time
	for chunk := range slices.Chunk(before, statementKeys) {
		keys := make([]recompute.Key, len(chunk))
		xids := make([]uint32, len(chunk))
		for i, p := range chunk {
			keys[i], xids[i] = p.key, p.lastXid
		}
		if err := a.setLockTimeout(ctx, true); err != nil {
			return 0, 0, err
		}
		n, err := a.table.KeysGuarded(ctx, a.conn, keys, xids)
		if dbconn.IsLockTimeout(err) {
			for _, p := range chunk {
				heldRows[p] = true
			}
			continue
		}
		if err != nil {
			return 0, 0, fmt.Errorf("apply keys changed before the hand-over: %w", err)
		}
		corrected += n
	}
	// Once, not per chunk held: a DeleteFunc per key was quadratic in the
	// flush's keys.
	entries = slices.DeleteFunc(entries, func(e *bufferedKey) bool { return heldRows[e] })
	for chunk := range slices.Chunk(entries, statementKeys) {
		keys := make([]recompute.Key, len(chunk))
		for i, p := range chunk {
			keys[i] = p.key
		}
		found, err := a.table.CheckKeys(ctx, a.conn, keys)
		if err != nil {
			return 0, 0, fmt.Errorf("check keys of %s: %w", a.relation, err)
		}
		clean := recompute.InParity(keys, found)
		if a.cfg.Checks == nil {
			return 0, 0, errors.New("applier: the application owns the new columns but Config.Checks is nil")
		}
		if err := a.cfg.Checks.Report(ctx, found, clean); err != nil {
			return 0, 0, fmt.Errorf("report checks: %w", err)
		}
		a.checked.Add(uint64(len(keys)))
		a.mismatches.Add(uint64(len(found)))
		for _, p := range chunk {
			delete(a.buf, p.key.ID())
		}
	}
	return corrected, len(heldRows), nil
}

// SetHandover says who owns the new columns: from position lsn on the
// application does, and the applier only checks keys and reports them to
// Config.Checks (keys whose latest change came before lsn are still
// corrected where their row is unchanged since); lsn 0 gives the new columns
// back to the expressions (a hand-over found premature).
func (a *Applier) SetHandover(lsn pglogrepl.LSN) {
	a.handover.Store(uint64(lsn))
	a.Hurry() // keys deferred until now are the expressions' still: correct them
}
