package applier

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/cdcbackfill/cdcbackfill/cdc"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// bufferedKey is a key in the buffer and the earliest transaction that changed it.
type bufferedKey struct {
	key  recompute.Key
	lsn  pglogrepl.LSN // FinalLSN (commit LSN) of that transaction
	time time.Time     // its commit time, zero when unknown
	// Of the latest transaction that changed the key: its commit LSN, time
	// and xid (the hand-over decides by them who owns the row).
	lastLSN  pglogrepl.LSN
	lastTime time.Time
	lastXid  uint32
	evidence bool // some change of the key shows the application writing the new columns
}

// SetConfirmed sets the starting position, the slot's confirmed_flush_lsn,
// before Run. The position never moves backwards.
func (a *Applier) SetConfirmed(lsn pglogrepl.LSN) { a.raiseConfirmed(lsn) }

// ConfirmedLSN is the position the slot may be confirmed to: every
// transaction committed before it has all its keys applied.
func (a *Applier) ConfirmedLSN() pglogrepl.LSN { return pglogrepl.LSN(a.confirmed.Load()) }

// WaitApplied blocks until ConfirmedLSN() >= lsn: every transaction committed
// before lsn is applied. It returns ctx's error, or ErrStopped once Run has
// returned without getting there.
func (a *Applier) WaitApplied(ctx context.Context, lsn pglogrepl.LSN) error {
	for {
		a.mu.Lock()
		advanced := a.advanced
		a.mu.Unlock()
		// Read after taking the channel: a raise in between closes it.
		if a.ConfirmedLSN() >= lsn {
			return nil
		}
		select {
		case <-advanced:
		case <-a.stopped:
			if a.ConfirmedLSN() >= lsn {
				return nil
			}
			return fmt.Errorf("wait for %s to be applied: %w at %s", lsn, ErrStopped, a.ConfirmedLSN())
		case <-ctx.Done():
			return fmt.Errorf("wait for %s to be applied (at %s): %w", lsn, a.ConfirmedLSN(), ctx.Err())
		}
	}
}

// bufferLimit is how many keys (and transactions) the buffer holds before
// it is flushed however young they are.
func (a *Applier) bufferLimit() int {
	if a.deferring() {
		return a.cfg.MaxDeferredKeys
	}
	return a.cfg.MaxBatchKeys
}

// PendingThrough returns the buffered keys once every transaction
// committed before lsn has been received and none is in flight; until then
// it polls, calling wait between looks, until ctx ends. Call it while held.
func (a *Applier) PendingThrough(ctx context.Context, lsn pglogrepl.LSN, wait func()) ([]recompute.Key, error) {
	for {
		var keys []recompute.Key
		ready := false
		err := a.do(ctx, func() {
			if a.inFlight || a.lastEnd < lsn {
				return
			}
			ready = true
			keys = make([]recompute.Key, 0, len(a.buf))
			for _, p := range a.buf {
				keys = append(keys, p.key)
			}
		})
		if err != nil {
			return nil, err
		}
		if ready {
			return keys, nil
		}
		wait()
		t := time.NewTimer(2 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

func (a *Applier) raiseConfirmed(lsn pglogrepl.LSN) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if uint64(lsn) <= a.confirmed.Load() {
		return
	}
	a.confirmed.Store(uint64(lsn))
	close(a.advanced)
	a.advanced = make(chan struct{})
}

// add buffers key for the transaction committed at lsn, keeping the earliest
// transaction of a key already there.
func (a *Applier) add(key recompute.Key, lsn pglogrepl.LSN, t time.Time, xid uint32, evidence bool) {
	c := key.ID()
	if p, ok := a.buf[c]; ok {
		// Only a replay after Reset brings an earlier transaction.
		if lsn < p.lsn {
			p.lsn, p.time = lsn, t
		}
		if lsn >= p.lastLSN {
			p.lastLSN, p.lastTime, p.lastXid = lsn, t, xid
		}
		p.evidence = p.evidence || evidence
	} else {
		if len(a.buf) == 0 {
			wait := a.cfg.FlushInterval
			if a.deferring() {
				wait = a.cfg.Defer
			}
			a.due = time.Now().Add(wait)
		}
		a.buf[c] = &bufferedKey{key: key, lsn: lsn, time: t, lastLSN: lsn, lastTime: t, lastXid: xid, evidence: evidence}
		a.pendingKeys.Store(int64(len(a.buf)))
	}
	if len(a.buf) == 1 || lsn < a.minLSN {
		a.minLSN, a.minTime = lsn, t
	}
}

// advance raises the confirmed position as far as the state allows: the end
// of the last commit when nothing is pending, else the earliest commit LSN
// pending, which the server sends again after a restart.
func (a *Applier) advance() {
	target, t := a.lastEnd, a.lastCommit
	if len(a.buf) > 0 || a.inFlight {
		target, t = pglogrepl.LSN(^uint64(0)), time.Time{}
		if len(a.buf) > 0 {
			target, t = a.minLSN, a.minTime
		}
		if a.inFlight && a.txLSN < target {
			target, t = a.txLSN, a.txTime
		}
	}
	// A replay after a reconnect brings transactions below confirmed again:
	// they were applied before confirmed passed them, so confirmed stays.
	if target < a.ConfirmedLSN() {
		return
	}
	a.raiseConfirmed(target)
	if !t.IsZero() {
		a.commitTime.Store(t.UnixNano())
	}
}

// keepHeld removes the keys of chunk from the buffer except those skipped.
// A skipped key comes back in the text PostgreSQL prints for it, which may
// differ from the text the stream gave ("007" for an integer 7, a timestamptz
// in another time zone); one not found is buffered under that text with the
// earliest transaction among the keys removed, so confirmed never passes it.
func (a *Applier) keepHeld(chunk []*bufferedKey, skipped []recompute.Key) {
	keep := make(map[string]bool, len(skipped))
	for _, k := range skipped {
		keep[k.ID()] = true
	}
	var earliest *bufferedKey // of the keys removed, one of which a misprinted skipped key is
	for _, p := range chunk {
		c := p.key.ID()
		if keep[c] {
			delete(keep, c) // found: stays as it is
			continue
		}
		delete(a.buf, c)
		if earliest == nil || p.lsn < earliest.lsn {
			earliest = p
		}
	}
	if earliest == nil {
		earliest = slices.MinFunc(chunk, func(x, y *bufferedKey) int { return cmp.Compare(x.lsn, y.lsn) })
	}
	for _, k := range skipped {
		c := k.ID()
		if !keep[c] {
			continue
		}
		if p, ok := a.buf[c]; ok {
			if earliest.lsn < p.lsn {
				p.lsn, p.time = earliest.lsn, earliest.time
			}
		} else {
			a.buf[c] = &bufferedKey{key: k, lsn: earliest.lsn, time: earliest.time}
		}
	}
}

// deferring says whether corrections wait up to Config.Defer now.
func (a *Applier) deferring() bool { return a.cfg.Defer > 0 && a.handover.Load() == 0 }

// handle takes one event into the buffer and the transaction state.
func (a *Applier) handle(ctx context.Context, ev cdc.Event) error {
	a.events.Add(1)
	switch ev.Kind {
	case cdc.Begin:
		a.inFlight, a.txLSN, a.txTime = true, ev.FinalLSN, ev.CommitTime
	case cdc.Change:
		if ev.Relation != a.relation {
			// Ignoring it would confirm past a change of a table the
			// publication should not hold: stop before confirming anything
			// of this transaction (it is in flight, which holds confirmed).
			return &foreignRelationError{relation: ev.Relation, table: a.relation}
		}
		key, err := a.tableKey(ev)
		if err != nil {
			return err
		}
		var t time.Time
		if a.inFlight && ev.FinalLSN == a.txLSN {
			t = a.txTime
		}
		a.add(key, ev.FinalLSN, t, ev.Xid, a.isEvidence(key, ev.Image))
		if ev.Xid != 0 {
			a.xids[ev.Xid] = struct{}{}
		}
		return nil // the buffer only grew: confirmed cannot move
	case cdc.Commit:
		a.inFlight = false
		a.lastEnd = max(a.lastEnd, ev.EndLSN)
		a.lastCommit = ev.CommitTime
		a.streamTime.Store(ev.CommitTime.UnixNano())
		if len(a.buf) > 0 && !a.held && !time.Now().Before(a.due) {
			return a.flush(ctx)
		}
	case cdc.Idle:
		a.lastEnd = max(a.lastEnd, ev.EndLSN)
		if len(a.buf) > 0 && !a.held && !time.Now().Before(a.due) {
			return a.flush(ctx)
		}
	case cdc.Reset:
		// The transaction in flight will be sent again from its Begin; keys
		// it already gave stay buffered, which is harmless.
		a.inFlight = false
	}
	a.advance()
	return nil
}

// tableKey maps a Change's key, given in relation column order, to the
// table's primary key order.
func (a *Applier) tableKey(ev cdc.Event) (recompute.Key, error) {
	if len(ev.Key) != len(ev.KeyColumns) {
		return nil, fmt.Errorf("change of %s: %d key values for key columns %v", ev.Relation, len(ev.Key), ev.KeyColumns)
	}
	if !slices.Equal(ev.KeyColumns, a.keyCols) {
		idx := make([]int, len(a.table.Key))
		for i, k := range a.table.Key {
			idx[i] = slices.Index(ev.KeyColumns, k.Name)
			if idx[i] < 0 {
				return nil, fmt.Errorf("change of %s: replica identity columns %v lack primary key column %q",
					ev.Relation, ev.KeyColumns, k.Name)
			}
		}
		a.keyCols, a.keyIdx = ev.KeyColumns, idx
		a.keyInOrder = len(idx) == len(ev.KeyColumns)
		for i, j := range idx {
			a.keyInOrder = a.keyInOrder && i == j
		}
	}
	if a.keyInOrder {
		return ev.Key, nil // the event's own slice: no copy per change
	}
	key := make(recompute.Key, len(a.keyIdx))
	for i, j := range a.keyIdx {
		key[i] = ev.Key[j]
	}
	return key, nil
}
