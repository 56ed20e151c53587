package phases

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/applier"
	"github.com/cdcbackfill/cdcbackfill/cdc"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// cutover is one try of the cut-over. In one transaction it
//
//  1. lock: takes the ACCESS EXCLUSIVE lock the DDL needs anyway, first,
//     under a lock_timeout below deadlock_timeout (a weaker lock upgraded
//     later deadlocks with transactions that read then write, and if a
//     lock cycle forms it is the daemon that gives up);
//  2. catchUp: reads the WAL insert position and waits until the stream
//     has received everything up to it;
//  3. check: checks every key the stream delivered since the applier last
//     checked (the applier is held: its own statements would wait on the
//     lock), and the operator's abort and pause;
//  4. ddl: runs the contract statements under contract_policy.max_hold;
//  5. commit.
//
// A step that does not go through rolls back and releases the lock at once.
// The timings say how long the application may have queued behind it.
type cutover struct {
	d       *Daemon
	st      *state.Migration
	try     int
	longest *time.Duration // the longest stall over all tries of this contract phase

	stream *cdc.Stream
	ap     *applier.Applier
	tx     pgx.Tx
	lsn    pglogrepl.LSN   // the WAL insert position read under the lock
	keys   []recompute.Key // delivered since the applier's last check
	done   int             // contract statements run
	// committed: the cut-over's transaction committed; the applier is
	// then discarded, not released.
	committed bool

	asked, granted, received, checked time.Time
}

// cutover runs one try (see the cutover type).
func (d *Daemon) cutover(ctx context.Context, st *state.Migration, try int, longest *time.Duration) (cutoverResult, error) {
	c := &cutover{d: d, st: st, try: try, longest: longest}
	c.stream, c.ap = d.repl.pipe.Load().current()
	if c.ap == nil || c.stream == nil {
		return cutoverBehind, nil
	}
	if err := c.ap.Hold(ctx); err != nil {
		if errors.Is(err, applier.ErrStopped) {
			return cutoverBehind, nil // the pipeline is restarting: try again
		}
		return "", err
	}
	res, err := c.run(ctx)
	if !c.committed {
		_ = c.ap.Release(context.WithoutCancel(ctx))
	}
	return res, err
}

func (c *cutover) run(ctx context.Context) (cutoverResult, error) {
	tx, err := c.d.conn.Begin(ctx)
	if err != nil {
		return "", err
	}
	c.tx = tx
	defer tx.Rollback(context.WithoutCancel(ctx))
	for _, step := range []func(context.Context) (cutoverResult, error){c.lock, c.catchUp, c.check, c.ddl} {
		if res, err := step(ctx); res != "" || err != nil {
			if res != "" {
				tx.Rollback(ctx)
				c.stall()
			}
			return res, err
		}
	}
	return c.commit(ctx)
}

// stall is how long the application may have queued behind this try so
// far; it keeps the longest.
func (c *cutover) stall() time.Duration {
	s := time.Since(c.asked)
	*c.longest = max(*c.longest, s)
	return s
}

func (c *cutover) lock(ctx context.Context) (cutoverResult, error) {
	d := c.d
	lockTimeout, err := cutoverLockTimeout(ctx, d.conn, d.cfg.ContractPolicy.LockTimeout)
	if err != nil {
		return "", err
	}
	if err := dbconn.SetLockTimeout(ctx, c.tx, lockTimeout, true); err != nil {
		return "", err
	}
	c.asked = time.Now()
	if _, err := c.tx.Exec(ctx, "LOCK TABLE "+d.table.Ident()+" IN ACCESS EXCLUSIVE MODE"); err != nil {
		if dbconn.IsLockTimeout(err) {
			c.tx.Rollback(ctx)
			d.rlog.Warn("contract: cut-over could not get the table's lock; retrying", "try", c.try,
				"lock_timeout", lockTimeout, "blocked_by", d.ddlRunner().blockers(ctx, d.conn), "stall", c.stall().Round(time.Millisecond))
			return cutoverLocked, nil
		}
		return "", fmt.Errorf("contract: lock %s: %w", d.table.Ident(), err)
	}
	c.granted = time.Now()
	return "", nil
}

func (c *cutover) catchUp(ctx context.Context) (cutoverResult, error) {
	d := c.d
	var err error
	if c.lsn, err = insertLSN(ctx, c.tx); err != nil {
		return "", err
	}
	// WAL up to lsn may not be flushed yet (asynchronous commits, our own
	// lock record) and the walsender reads only what is: a synchronous
	// commit of our own flushes it and wakes the walsender at once, rather
	// than at the WAL writer's next round (up to wal_writer_delay).
	if err := d.store.FlushWAL(ctx, d.pool); err != nil {
		return "", fmt.Errorf("contract: %w", err)
	}
	c.stream.Poke()
	wctx, cancel := context.WithTimeout(ctx, d.cfg.ContractPolicy.CatchupTimeout)
	defer cancel()
	lastPoke := time.Now()
	c.keys, err = c.ap.PendingThrough(wctx, c.lsn, func() {
		if time.Since(lastPoke) >= 50*time.Millisecond {
			c.stream.Poke()
			lastPoke = time.Now()
		}
	})
	switch {
	case errors.Is(err, applier.ErrStopped):
		return cutoverBehind, nil // the pipeline is restarting: try again
	case err != nil && wctx.Err() != nil && ctx.Err() == nil:
		d.rlog.Warn("contract: cut-over gave up: the stream did not receive everything up to the lock in time; retrying",
			"try", c.try, "catchup_timeout", d.cfg.ContractPolicy.CatchupTimeout, "position", c.lsn, "stall", time.Since(c.asked).Round(time.Millisecond))
		return cutoverBehind, nil
	case err != nil:
		return "", err
	}
	c.received = time.Now()
	return "", nil
}

func (c *cutover) check(ctx context.Context) (cutoverResult, error) {
	d := c.d
	found, err := checkUnderLock(ctx, c.tx, d.store, d.table, c.keys)
	if err != nil {
		return "", err
	}
	if len(found) > 0 {
		c.tx.Rollback(ctx)
		if err := d.parity.Report(ctx, found, nil); err != nil {
			return "", err
		}
		d.log.Warn("contract: rows out of parity were written just before the cut-over; nothing was dropped",
			"rows", len(found), "key", d.table.KeyString(found[0].Key), "values", describeMismatch(d.table, found[0]), "stall", c.stall().Round(time.Millisecond))
		return cutoverMismatch, nil
	}
	abort, paused, err := d.store.LockForCutover(ctx, c.tx)
	switch {
	case err != nil:
		return "", err
	case abort:
		c.tx.Rollback(ctx)
		c.stall()
		return "", ErrAborted
	case paused:
		return cutoverPaused, nil
	}
	c.checked = time.Now()
	return "", nil
}

func (c *cutover) ddl(ctx context.Context) (cutoverResult, error) {
	d := c.d
	var err error
	c.done, err = d.contractInTx(ctx, c.tx, c.st.ContractDone)
	var over *overrunError
	if errors.As(err, &over) {
		c.tx.Rollback(ctx)
		d.control.overran.Store(over)
		d.log.Warn("contract: cut-over rolled back: a contract statement held the table's lock too long; it is not retried until the operator approves again",
			"statement", over.stmt, "ran", over.took.Round(time.Millisecond), "max_hold", d.cfg.ContractPolicy.MaxHold, "stall", c.stall().Round(time.Millisecond))
		if err := d.store.WithdrawApproval(ctx, d.conn, state.Contract, map[string]any{"statement": over.stmt, "ran_ms": ms(over.took),
			"max_hold_ms": ms(d.cfg.ContractPolicy.MaxHold)}); err != nil {
			return "", err
		}
		return cutoverOverran, nil
	}
	if err != nil {
		return "", err
	}
	// The publication goes in this transaction too, while the table's lock
	// keeps the application's writes out: a DROP PUBLICATION that commits
	// while a write is building its view of the table's publications fails
	// that write ("cache lookup failed for publication").
	if err := snapshot.DropPublication(ctx, c.tx, d.cfg.PublicationName()); err != nil {
		return "", fmt.Errorf("contract: %w", err)
	}
	return "", nil
}

func (c *cutover) commit(ctx context.Context) (cutoverResult, error) {
	d := c.d
	rec := state.Cutover{Tries: c.try, LockWaitMS: ms(c.granted.Sub(c.asked)), HeldMS: ms(time.Since(c.granted)), KeysChecked: len(c.keys),
		LongestStallMS: ms(max(*c.longest, time.Since(c.asked)))}
	if err := d.store.RecordCutover(ctx, c.tx, c.done, rec); err != nil {
		return "", err
	}
	if err := c.tx.Commit(ctx); err != nil {
		return "", fmt.Errorf("contract: commit the cut-over: %w", err)
	}
	c.committed = true
	s := c.stall()
	rec.LongestStallMS, rec.HeldMS = ms(*c.longest), ms(time.Since(c.granted))
	_ = c.ap.Discard(context.WithoutCancel(ctx))
	if err := d.store.SaveCutover(context.WithoutCancel(ctx), d.conn, rec); err != nil {
		return "", err
	}
	d.log.Info("contract: cut-over committed: the contract DDL ran with nothing unseen since the last check",
		"tries", c.try, "lock_wait", c.granted.Sub(c.asked).Round(time.Microsecond), "held", time.Since(c.granted).Round(time.Microsecond),
		"stall", s.Round(time.Microsecond), "longest_stall", c.longest.Round(time.Microsecond), "keys_checked", len(c.keys),
		"stream_wait", c.received.Sub(c.granted).Round(time.Microsecond), "check", c.checked.Sub(c.received).Round(time.Microsecond),
		"ddl", time.Since(c.checked).Round(time.Microsecond))
	return cutoverDone, d.store.Event(context.WithoutCancel(ctx), d.conn, state.Contract, "cutover", map[string]any{
		"tries": c.try, "lock_wait_ms": rec.LockWaitMS, "held_ms": rec.HeldMS, "longest_stall_ms": rec.LongestStallMS, "keys_checked": len(c.keys)})
}
