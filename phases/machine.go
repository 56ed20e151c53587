package phases

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/jackc/pglogrepl"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// control holds the operator's flags as the state row last said, refreshed
// by the watcher and read by the phases.
type control struct {
	paused   atomic.Bool
	abort    atomic.Bool
	approved atomic.Value // state.Phase: the phase an operator approved
	// approvedHandover is the hand-over approve recorded in sync (0: none).
	approvedHandover atomic.Uint64
	// overran is the contract statement that ran past max_hold in the
	// last cut-over; the next waits for the operator's approve.
	overran atomic.Pointer[overrunError]
}

// approvedFor reports whether an operator approved phase.
func (c *control) approvedFor(p state.Phase) bool { return c.approved.Load().(state.Phase) == p }

// recordedHandover is the hand-over approve recorded in sync (0: none).
func (c *control) recordedHandover() pglogrepl.LSN { return pglogrepl.LSN(c.approvedHandover.Load()) }

// phases runs the state machine until done, ctx ends or an error.
func (d *Daemon) phases(ctx context.Context) error {
	for ctx.Err() == nil {
		st, err := d.store.Load(ctx, d.conn)
		if err != nil {
			return err
		}
		d.setControl(st)
		if err := d.ownerOf(ctx, st); err != nil {
			return err
		}
		d.figures.waiting.Store("")
		done, err := d.runPhase(ctx, st)
		if done {
			return err // ended, or a phase this daemon does not know
		}
		// The phase moved on (or failed): what its loops repeated is over.
		d.rlog.End()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
	return nil
}

// runPhase runs the phase the state row is in; done is true once the
// migration has ended.
func (d *Daemon) runPhase(ctx context.Context, st *state.Migration) (done bool, err error) {
	switch st.Phase {
	case state.Expand:
		return false, d.expand(ctx, st)
	case state.Backfill:
		return false, d.backfill(ctx, st)
	case state.Sync:
		return false, d.sync(ctx, st)
	case state.Verify:
		return false, d.verify(ctx, st)
	case state.Contract:
		return false, d.contract(ctx, st)
	case state.Done, state.Aborted:
		d.log.Info("migration is " + string(st.Phase))
		return true, nil
	}
	return true, fmt.Errorf("state row of %q has unknown phase %q", d.cfg.Name, st.Phase)
}

// ownerOf tells the stream who owns the new columns in the phase the state
// row is in: the application from the recorded hand-over, else the
// expressions.
func (d *Daemon) ownerOf(ctx context.Context, st *state.Migration) error {
	switch {
	case st.HandoverLSN != nil:
		d.repl.handover.Store(uint64(*st.HandoverLSN))
	case st.Phase == state.Verify || st.Phase == state.Contract && st.ContractDone == 0:
		// Reached verify under a daemon that did not record the
		// hand-over: the application owns the new columns from now.
		lsn, err := insertLSN(ctx, d.conn)
		if err != nil {
			return err
		}
		if err := d.store.SetHandover(ctx, d.conn, lsn); err != nil {
			return err
		}
		d.repl.setHandover(lsn)
	default:
		d.repl.setHandover(0)
	}
	return nil
}

func (d *Daemon) setControl(st *state.Migration) {
	c := &d.control
	// Operator actions are logged once, when the daemon first sees them.
	if was := c.paused.Swap(st.Paused); was != st.Paused {
		if st.Paused {
			d.log.Info("paused by operator: batches and phase changes stop; the stream keeps checking the table", "phase", st.Phase, "rows_done", st.RowsDone)
		} else {
			d.log.Info("resumed by operator", "phase", st.Phase, "rows_done", st.RowsDone)
		}
	}
	if !c.abort.Swap(st.AbortRequested) && st.AbortRequested {
		d.log.Info("abort requested by operator", "phase", st.Phase, "rollback", st.RollbackRequested)
	}
	var approved state.Phase
	if st.ApprovedPhase != nil {
		approved = *st.ApprovedPhase
	}
	if was := c.approved.Swap(approved); was != approved && approved != "" {
		d.log.Info("approved by operator", "phase", approved, "force", st.ForceApproved)
	}
	// approve records the hand-over itself, in sync; the applier's gate has
	// stopped its corrections since, and the applier is told at once.
	var recorded pglogrepl.LSN
	if st.Phase == state.Sync && st.HandoverLSN != nil {
		recorded = *st.HandoverLSN
	}
	if c.approvedHandover.Swap(uint64(recorded)) != uint64(recorded) && recorded != 0 && d.repl.handover.Load() == 0 {
		d.repl.setHandover(recorded)
	}
}

// abortable is true until the contract DDL has committed.
func abortable(st *state.Migration) bool {
	return !st.Phase.Ended() && !(st.Phase == state.Contract && st.ContractDone > 0)
}

// insertLSN is the server's current WAL insert position: every transaction
// committed so far ends before it.
func insertLSN(ctx context.Context, q dbconn.Querier) (pglogrepl.LSN, error) {
	var at string
	if err := q.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&at); err != nil {
		return 0, fmt.Errorf("read the WAL insert position: %w", err)
	}
	return pglogrepl.ParseLSN(at)
}
