package applier

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

// statementKeys bounds the keys of one recompute statement. A statement
// holds the row locks of what it has updated until it commits, and the
// application's writes to those rows wait. With durable commits a
// statement's time is mostly its commit's WAL flush, about the same for
// 100 keys as for 1000: each row is held about as long either way, and
// every statement saved is a WAL flush the application's commits no longer
// queue behind (make bench, PostgreSQL 15: 100 keys per statement left the
// application 0.66 of its no-migration capacity in sync; 1000, with the
// stream's longer gathering, 0.81). The bound keeps a burst of keys from
// holding thousands of rows at once.
const statementKeys = 1000

// flush recomputes every buffered key (or, once the application owns the
// new columns, checks it); held keys stay for the next flush.
//
// Its statements must see every transaction that put keys in the buffer
// (a.xids). The walsender sends a transaction as soon as its commit record
// is flushed, which may be before the committing backend has left the proc
// array: for microseconds normally, for the whole wait for a synchronous
// standby when synchronous replication is on. A statement whose snapshot is
// taken in that window still sees the row as it was before the transaction
// (an inserted row not at all), finds it in parity or missing, and the key
// would count as applied, the slot confirmed past a change never applied.
// Once a transaction is no longer running in one snapshot it is visible to
// every later one. Correcting, each statement reports its snapshot and runs
// again when needed (correct); checking, the statements report none, so a
// snapshot is polled first (waitVisible).
func (a *Applier) flush(ctx context.Context) error {
	begin := time.Now()
	entries := make([]*bufferedKey, 0, len(a.buf))
	for _, p := range a.buf {
		entries = append(entries, p)
	}
	unseen := slices.Collect(maps.Keys(a.xids))
	var corrected int64
	var held int
	var err error
	if h := pglogrepl.LSN(a.handover.Load()); h != 0 {
		corrected, held, err = a.checkAfterHandover(ctx, entries, unseen, h)
	} else {
		corrected, held, err = a.correct(ctx, entries, unseen)
		var ho *handedOver
		if errors.As(err, &ho) {
			// Handed over while correcting: what the earlier statements
			// wrote came before it; the rest of the buffer is checked.
			a.SetHandover(ho.lsn)
			a.log.Info("applier: the hand-over is recorded; from now on the daemon checks the new columns and never writes them", "handover_lsn", ho.lsn)
			var c int64
			var h int
			c, h, err = a.checkAfterHandover(ctx, slices.Collect(maps.Values(a.buf)), unseen, ho.lsn)
			corrected, held = corrected+c, held+h
		}
	}
	if err != nil {
		return err
	}
	clear(a.xids)
	a.flushes.Add(1)
	a.corrections.Add(uint64(corrected))
	a.retries.Add(uint64(held))
	a.pendingKeys.Store(int64(len(a.buf)))

	a.minLSN, a.minTime = 0, time.Time{}
	first := true
	for _, p := range a.buf {
		if first || p.lsn < a.minLSN {
			a.minLSN, a.minTime, first = p.lsn, p.time, false
		}
	}
	// Held keys wait one interval; a flush that applied nothing (every key
	// held) also stops a full buffer from flushing again before then.
	a.backoff = len(a.buf) > 0 && len(a.buf) >= len(entries)
	if len(a.buf) > 0 {
		a.due = time.Now().Add(a.cfg.FlushInterval)
	}
	a.advance()
	a.log.Debug("flushed keys", "keys", len(entries), "corrected", corrected, "held", held,
		"took", time.Since(begin), "confirmed", a.ConfirmedLSN())
	return nil
}

// correct recomputes entries while the expressions own the new columns,
// counting the evidence of dual-write in statements that corrected nothing.
//
// unseen are the buffer's transactions (see flush). Rather than a snapshot
// of its own first, a round trip per flush, each statement reports the
// snapshot it ran with; in the rare case one of unseen was still running in
// it, the statement runs again once they are visible. Once one statement's
// snapshot has them all, the later ones' snapshots do too.
func (a *Applier) correct(ctx context.Context, entries []*bufferedKey, unseen []uint32) (corrected int64, held int, err error) {
	deferred := a.deferring()
	if deferred {
		// Rows in index order: a statement's rows share pages, and the
		// bulk correction walks the table once.
		slices.SortFunc(entries, func(x, y *bufferedKey) int { return a.table.CompareKeys(x.key, y.key) })
	}
	for chunk := range slices.Chunk(entries, min(a.cfg.MaxBatchKeys, statementKeys)) {
		if deferred && a.cfg.Pace != nil {
			if err := a.cfg.Pace(ctx, len(chunk)); err != nil {
				return 0, 0, err
			}
		}
		keys := make([]recompute.Key, len(chunk))
		for i, p := range chunk {
			keys[i] = p.key
		}
		res, err := a.apply(ctx, keys)
		if err == nil && len(unseen) > 0 {
			res, err = a.applyAgainIfUnseen(ctx, keys, res, unseen)
			unseen = nil
		}
		if err != nil {
			return 0, 0, fmt.Errorf("apply keys: batch of %d keys of %s: %w", len(keys), a.relation, err)
		}
		if res.Handover != "" {
			// The gate found the hand-over recorded: nothing was written,
			// and the keys left are the application's rules' now.
			h, err := pglogrepl.ParseLSN(res.Handover)
			if err != nil {
				return 0, 0, fmt.Errorf("read the hand-over position %q: %w", res.Handover, err)
			}
			return corrected, held, &handedOver{lsn: h}
		}
		corrected += res.Corrected
		held += len(res.Skipped)
		if len(res.Samples) > 0 {
			a.mu.Lock()
			a.recent = append(slices.Clone(res.Samples), a.recent...)
			a.recent = a.recent[:min(len(a.recent), maxRecent)]
			a.mu.Unlock()
		}
		a.countEvidence(chunk, res)
		a.keepHeld(chunk, res.Skipped)
	}
	return corrected, held, nil
}

// applyAgainIfUnseen runs keys' statement again when any of xids was still
// running in the snapshot of the run that gave res, once they are all
// visible: that run may have missed their rows (an insert not seen at all).
// The result counts the corrections of both runs.
func (a *Applier) applyAgainIfUnseen(ctx context.Context, keys []recompute.Key, res recompute.Result, xids []uint32) (recompute.Result, error) {
	running, err := stillRunning(res.Snapshot, xids)
	if err != nil || len(running) == 0 {
		return res, err
	}
	if _, err := a.waitVisible(ctx, running); err != nil {
		return res, err
	}
	again, err := a.apply(ctx, keys)
	if err != nil {
		return res, err
	}
	again.Corrected += res.Corrected
	again.Samples = append(res.Samples, again.Samples...)
	return again, nil
}

// apply recomputes keys as one plain UPDATE under a lock_timeout of
// recompute.FastLockTimeout (the session's, set once: a transaction to set
// it per statement cost three more round trips each); only when the
// application holds one of the rows longer does it run, without the
// time-out, the statement that locks rows ahead and passes over held ones.
// Locking ahead writes every row twice (the lock, then the update), which at
// a busy application's rate was half of the applier's cost.
//
// While held rows are being passed over (the last locking statement skipped
// some), the next statement locks ahead at once rather than wait out the
// time-out again.
func (a *Applier) apply(ctx context.Context, keys []recompute.Key) (recompute.Result, error) {
	if !a.contended {
		if err := a.setLockTimeout(ctx, true); err != nil {
			return recompute.Result{}, err
		}
		res, err := a.table.KeysFast(ctx, a.conn, a.cfg.Gate, keys)
		if !dbconn.IsLockTimeout(err) {
			return res, err
		}
	}
	if err := a.setLockTimeout(ctx, false); err != nil {
		return recompute.Result{}, err
	}
	a.lockedFlushes.Add(1)
	res, err := a.table.KeysGated(ctx, a.conn, a.cfg.Gate, keys)
	a.contended = err == nil && len(res.Skipped) > 0 && res.Handover == ""
	return res, err
}

// setLockTimeout sets the session's lock_timeout to recompute.FastLockTimeout
// (fast) or Config.LockTimeout, unless it is set so already.
func (a *Applier) setLockTimeout(ctx context.Context, fast bool) error {
	if a.fastTimeout == fast && a.timeoutSet {
		return nil
	}
	d := a.cfg.LockTimeout
	if fast {
		d = recompute.FastLockTimeout
	}
	if err := dbconn.SetLockTimeout(ctx, a.conn, d, false); err != nil {
		return err
	}
	a.fastTimeout, a.timeoutSet = fast, true
	return nil
}
