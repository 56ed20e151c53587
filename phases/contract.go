package phases

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// contract waits for approval (manual) or goes on (auto), then runs the
// cut-over: the contract DDL in one transaction with the check of every
// key the stream delivered since the last check, under the table's lock, so
// no write can slip between the last check and the DROP. Then it drops
// slot, publication and origins. Abort and pause are honoured until the
// DDL commits.
func (d *Daemon) contract(ctx context.Context, st *state.Migration) error {
	if st.ContractDone > 0 {
		return d.finishContract(ctx, st)
	}
	if err := d.startPipeline(ctx); err != nil {
		return err
	}
	c := &contractRun{backoff: dbconn.NewBackoff(100*time.Millisecond, 10*time.Second)}
	for {
		if err := d.repl.pipe.Load().failure(); err != nil {
			return fmt.Errorf("sync stream: %w", err)
		}
		st, outstanding, err := d.loadAndRecheck(ctx)
		if err != nil {
			return err
		}
		if !c.prepared && outstanding == 0 {
			// The constraints on new columns, NOT VALID then validated,
			// before any cut-over: it only attaches them.
			if c.prepared, err = d.constraintsReady(ctx); err != nil {
				return err
			}
			if !c.prepared {
				continue
			}
		}
		switch {
		case outstanding > 0 && d.cfg.DualWrite.Detect == config.DetectAuto:
			return d.backToSync(ctx, state.Contract, outstanding)
		case outstanding > 0:
			d.log.Warn("contract: rows out of parity appeared; back to verify, where the hold starts again once none is left", "rows", outstanding)
			return d.store.BackToVerify(ctx, d.conn, map[string]any{"rows": outstanding})
		case !d.contractWaits(st):
			if done, err := d.tryCutover(ctx, st, c); done || err != nil {
				return err
			}
			continue
		}
		if err := dbconn.Sleep(ctx, 200*time.Millisecond); err != nil {
			return nil
		}
	}
}

// contractRun is what the contract phase carries from one try of the
// cut-over to the next.
type contractRun struct {
	prepared bool // the constraints on new columns are validated
	tries    int
	longest  time.Duration // the longest stall over all tries
	backoff  *dbconn.Backoff
}

// contractWaits says whether the cut-over waits for the operator (a
// pause, an approve) and what for, in status.
func (d *Daemon) contractWaits(st *state.Migration) bool {
	manual := d.cfg.ContractPolicy.Mode == config.ContractManual
	stillUsed := st.OldUsage != nil && len(st.OldUsage.Still) > 0
	switch {
	case d.control.paused.Load():
		d.figures.waiting.Store("resume: the migration is paused before the contract DDL (cdcbackfill resume)")
	case d.control.overran.Load() != nil && (st.ApprovedPhase == nil || *st.ApprovedPhase != state.Contract):
		// Read from the state row just loaded: the withdrawal of the
		// approval is in it, and only a new approve lifts it.
		over := d.control.overran.Load()
		d.figures.waiting.Store(fmt.Sprintf("%s; make it cheaper (see \"What DDL is safe\" in the README) or raise contract_policy.max_hold (%s), then cdcbackfill approve to try the cut-over again",
			over, d.cfg.ContractPolicy.MaxHold))
		d.rlog.Info("contract: waiting for the operator after a contract statement overran max_hold", "statement", over.stmt)
	case manual && !d.control.approvedFor(state.Contract):
		msg := "approval of the contract: cdcbackfill approve"
		if stillUsed {
			msg = fmt.Sprintf("approval of the contract: %d statements still use the old column (see status); cdcbackfill approve --force once nothing needs it", len(st.OldUsage.Still))
		}
		d.figures.waiting.Store(msg)
		// One message whatever the count in msg: the repeats are the same wait.
		d.rlog.Info("contract: parity holds; waiting for approval", "waiting_for", msg)
	case manual && stillUsed && !st.ForceApproved:
		d.figures.waiting.Store("cdcbackfill approve --force: statements still use the old column (see status)")
	default:
		return false
	}
	return true
}

// tryCutover runs one try of the cut-over; done says that the contract
// phase ends with err (the cut-over committed, failed, or gave up).
func (d *Daemon) tryCutover(ctx context.Context, st *state.Migration, c *contractRun) (done bool, err error) {
	c.tries++
	res, err := d.cutover(ctx, st, c.tries, &c.longest)
	switch {
	case err != nil:
		return true, err
	case res == cutoverDone:
		return true, d.finishContract(ctx, nil)
	case res == cutoverMismatch:
		return false, nil // the loop sends the migration back
	case res == cutoverPaused, res == cutoverOverran:
		c.tries-- // not a failed try; an overrun waits for the operator
		return false, nil
	}
	d.control.overran.Store(nil)
	if c.tries > d.cfg.DDL.MaxRetries {
		return true, fmt.Errorf("contract: the cut-over did not succeed in %d tries (last: %s); end the sessions that hold %s, or retry later (raise ddl.max_retries to try longer)",
			c.tries, res, d.table.Ident())
	}
	return dbconn.Sleep(ctx, c.backoff.Next()) != nil, nil
}

// cutoverResult is how one try of the cut-over ended.
type cutoverResult string

const (
	cutoverDone     cutoverResult = "done"
	cutoverLocked   cutoverResult = "the table's lock was not granted within contract_policy.lock_timeout"
	cutoverBehind   cutoverResult = "the stream did not receive everything before the lock within contract_policy.catchup_timeout"
	cutoverMismatch cutoverResult = "rows out of parity under the lock"
	cutoverPaused   cutoverResult = "paused by operator"
	cutoverOverran  cutoverResult = "a contract statement ran longer than contract_policy.max_hold under the lock"
)

// overrunError is a contract statement cancelled by max_hold in the
// cut-over: retrying it as it is would only hold the lock that long again.
type overrunError struct {
	stmt string
	took time.Duration
}

func (e *overrunError) Error() string {
	return fmt.Sprintf("the contract statement %q ran %s under the table's ACCESS EXCLUSIVE lock, longer than contract_policy.max_hold, and was rolled back",
		e.stmt, e.took.Round(time.Millisecond))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// checkUnderLock checks, inside the cut-over's transaction, the keys the
// stream delivered since the applier's last check and the rows kept out of
// parity; it returns the rows out of parity that are not accepted as they
// are.
func checkUnderLock(ctx context.Context, tx pgx.Tx, store state.Store, t *recompute.Table, keys []recompute.Key) ([]recompute.Mismatch, error) {
	kept, err := store.MismatchKeys(ctx, tx, 100000)
	if err != nil {
		return nil, err
	}
	all := append(keys, kept...)
	var found []recompute.Mismatch
	for len(all) > 0 {
		n := min(len(all), 1000)
		f, err := t.CheckKeys(ctx, tx, all[:n])
		if err != nil {
			return nil, fmt.Errorf("contract: check the keys delivered since the last check: %w", err)
		}
		found = append(found, f...)
		all = all[n:]
	}
	if len(found) == 0 {
		return nil, nil
	}
	accepted, err := store.AcceptedAsIs(ctx, tx, found)
	if err != nil {
		return nil, err
	}
	var out []recompute.Mismatch
	seen := map[string]bool{}
	for _, m := range found {
		k := m.Key.ID()
		if accepted[k] || seen[k] {
			continue
		}
		seen[k] = true
		out = append(out, m)
	}
	return out, nil
}

// contractInTx runs the contract statements from index from on inside the
// cut-over's transaction. A statement that refuses a transaction block
// (CREATE or DROP INDEX CONCURRENTLY) and every one after it run after the
// commit (finishContract): the old column is gone by then. It returns the
// number of statements done.
//
// The statements together run under contract_policy.max_hold (each one's
// statement_timeout is what is left of it): lock_timeout bounds the wait
// for a lock, not how long a statement then holds the table's.
func (d *Daemon) contractInTx(ctx context.Context, tx pgx.Tx, from int) (int, error) {
	start := time.Now()
	defer tx.Exec(context.WithoutCancel(ctx), "SET LOCAL statement_timeout = 0")
	stmts := cutoverStatements(d.finish)
	for i := from; i < len(stmts); i++ {
		stmt := stmts[i]
		if _, err := tx.Exec(ctx, "SAVEPOINT cdcb_contract"); err != nil {
			return 0, err
		}
		left := max(d.cfg.ContractPolicy.MaxHold-time.Since(start), time.Millisecond)
		if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL statement_timeout = %d", max(left.Milliseconds(), 1))); err != nil {
			return 0, err
		}
		began := time.Now()
		if _, err := tx.Exec(ctx, stmt); err != nil {
			if dbconn.SQLState(err) == pgerrcode.QueryCanceled && ctx.Err() == nil {
				return 0, &overrunError{stmt: stmt, took: time.Since(began)}
			}
			if dbconn.SQLState(err) == pgerrcode.ActiveSQLTransaction {
				if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT cdcb_contract"); rerr != nil {
					return 0, rerr
				}
				if i == from {
					return 0, fmt.Errorf("contract: the first contract statement %q cannot run in a transaction block; the cut-over needs it to (put a statement that drops the old column first)", stmt)
				}
				return i, nil
			}
			return 0, fmt.Errorf("contract: DDL %q: %w", stmt, err)
		}
		d.log.Info("contract: DDL ran in the cut-over", "statement", stmt, "step", i+1, "of", len(stmts))
	}
	return len(stmts), nil
}

// cutoverLockTimeout is contract_policy.lock_timeout, kept below the
// server's deadlock_timeout.
func cutoverLockTimeout(ctx context.Context, q dbconn.Querier, want time.Duration) (time.Duration, error) {
	var ms float64
	if err := q.QueryRow(ctx, `SELECT setting::float8 FROM pg_settings WHERE name = 'deadlock_timeout'`).Scan(&ms); err != nil {
		return 0, fmt.Errorf("read deadlock_timeout: %w", err)
	}
	deadlock := time.Duration(ms * float64(time.Millisecond))
	lt := want
	if lt >= deadlock {
		lt = deadlock / 2
	}
	return lt, nil
}

// finishContract runs what is left after the cut-over committed: the
// statements that could not run in its transaction, then drops slot,
// publication and origins.
func (d *Daemon) finishContract(ctx context.Context, st *state.Migration) error {
	d.repl.stopPipeline()
	if st == nil {
		var err error
		if st, err = d.store.Load(ctx, d.conn); err != nil {
			return err
		}
	}
	if err := d.runDDL(ctx, state.Contract, cutoverStatements(d.finish), st.ContractDone); err != nil {
		return err
	}
	if err := d.dropReplication(ctx); err != nil {
		return err
	}
	d.rlog.End() // the waits of the contract are over: summarized before "done", not after
	d.log.Info("migration done: contract DDL ran; slot, publication and origins dropped")
	return d.store.Move(ctx, d.conn, state.Contract, state.Done, nil)
}
