package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// Phase is where a migration is, as stored in cdcbackfill.migrations.phase.
type Phase string

const (
	Expand   Phase = "expand"
	Backfill Phase = "backfill"
	Sync     Phase = "sync"
	Verify   Phase = "verify"
	Contract Phase = "contract"
	Done     Phase = "done"
	Aborted  Phase = "aborted"
)

// Ended is true for the phases nothing follows.
func (p Phase) Ended() bool { return p == Done || p == Aborted }

// Plan is what the backfill covers, as saved in the state row.
type Plan struct {
	snapshot.Plan
	// Recovered is set when the plan was read after the slot existed but
	// without its snapshot (a crash between the two); see snapshot.ReadPlanNow.
	Recovered bool `json:"recovered,omitempty"`
}

// Migration is one row of cdcbackfill.migrations.
type Migration struct {
	Name              string
	Phase             Phase
	ExpandDone        int
	ContractDone      int
	RollbackDone      int
	SlotLSN           *string
	Plan              *Plan
	Ranges            []snapshot.Range
	RowsDone          int64
	RowsTotal         int64
	SyncEvents        int64
	Corrections       int64
	LastCorrectionAt  *time.Time
	VerifyCursor      recompute.Key
	VerifyRowsChecked int64
	// VerifyMismatches counts the rows ever found out of parity while the
	// application owned the new columns; Outstanding says how many are now.
	VerifyMismatches int64
	Paused           bool
	ApprovedPhase    *Phase
	AbortRequested   bool
	// RollbackRequested: the abort also runs the rollback statements.
	RollbackRequested bool
	Stats             Stats
	Error             *string
	CreatedAt         time.Time
	UpdatedAt         time.Time
	PhaseStartedAt    time.Time
	// HandoverLSN is the WAL position from which the application owns the
	// new columns (nil before dual-write).
	HandoverLSN *pglogrepl.LSN
	// PassDone: a whole verify pass has ended since the migration entered
	// verify.
	PassDone bool
	// HoldProven is how long parity has been proven clean, with the stream
	// caught up, since the last mismatch; downtime never counts.
	HoldProven time.Duration
	// PrematureDetections counts auto-detected dual-writes that a later
	// correction proved wrong.
	PrematureDetections int
	AcceptedMismatches  int64
	// ForceApproved: the contract was approved with --force, despite
	// statements that still use the old column.
	ForceApproved bool
	OldUsage      *OldUsage
	Cutover       *Cutover
}

// Stats are live figures the daemon refreshes for `status` and /status.
type Stats struct {
	RowsPerSecond  float64 `json:"rows_per_second"`
	EtaSeconds     float64 `json:"eta_seconds"`
	LagBytes       int64   `json:"lag_bytes"`
	LagSeconds     float64 `json:"lag_seconds"`
	ThrottleReason string  `json:"throttle_reason,omitempty"`
	// CorrectionSamples are keys the stream recently had to correct.
	CorrectionSamples []string `json:"correction_samples,omitempty"`
	// DualWrite is the evidence of dual-write (sync, detect auto).
	DualWrite *DualWrite `json:"dual_write,omitempty"`
	// DeferredKeys are the changed keys whose correction waits
	// (sync.correction deferred); 0 otherwise.
	DeferredKeys int `json:"deferred_keys,omitempty"`
	// Waiting says what the phase waits for, in a sentence.
	Waiting     string `json:"waiting,omitempty"`
	HeartbeatAt string `json:"heartbeat_at,omitempty"`
}

// DualWrite is how far the evidence of dual-write has come.
type DualWrite struct {
	Evidence           uint64  `json:"evidence"`
	MinEvidence        int     `json:"min_evidence"`
	QuietSeconds       float64 `json:"quiet_seconds"`
	QuietPeriodSeconds float64 `json:"quiet_period_seconds"`
	Missing            string  `json:"missing,omitempty"`
}

// OldUsage is what pg_stat_statements said of the statements that use the
// old column(s) during the hold.
type OldUsage struct {
	Since    time.Time        `json:"since"`
	Baseline map[string]int64 `json:"baseline"` // queryid -> calls at Since
	// Still are the statements that ran since, without the new columns.
	Still []UsedBy `json:"still,omitempty"`
}

// UsedBy is one statement that used an old column.
type UsedBy struct {
	Query string `json:"query"`
	Calls int64  `json:"calls"`
}

// Cutover is what the contract cut-over cost the application.
type Cutover struct {
	Tries int `json:"tries"`
	// LongestStallMS is the longest time, over all tries, from asking for
	// the table's lock to releasing it: the most an application statement
	// queued behind it.
	LongestStallMS float64 `json:"longest_stall_ms"`
	LockWaitMS     float64 `json:"lock_wait_ms"` // of the try that committed
	HeldMS         float64 `json:"held_ms"`      // of the try that committed
	KeysChecked    int     `json:"keys_checked"` // under the lock, by the try that committed
}

// ErrNoMigration is returned when no state row exists for the name.
var ErrNoMigration = errors.New("no migration of that name")

// Store reads and writes the state of one migration.
type Store struct {
	Name string
}

const selectMigration = `SELECT name, phase, expand_done, contract_done, rollback_done, slot_lsn::text,
	plan, ranges, rows_done, rows_total, sync_events, corrections, last_correction_at,
	verify_cursor, verify_rows_checked, verify_mismatches, paused, approved_phase, abort_requested,
	rollback_requested, stats, error, created_at, updated_at, phase_started_at,
	handover_lsn::text, pass_done, hold_proven_ms, premature_detections, accepted_mismatches,
	force_approved, old_usage, cutover
FROM cdcbackfill.migrations WHERE name = $1`

// Load reads the state row; ErrNoMigration when there is none.
func (s Store) Load(ctx context.Context, q dbconn.Querier) (*Migration, error) {
	var m Migration
	var ranges []byte
	var handover *string
	var holdMS int64
	err := q.QueryRow(ctx, selectMigration, s.Name).Scan(&m.Name, &m.Phase, &m.ExpandDone, &m.ContractDone,
		&m.RollbackDone, &m.SlotLSN, &m.Plan, &ranges, &m.RowsDone, &m.RowsTotal, &m.SyncEvents,
		&m.Corrections, &m.LastCorrectionAt, &m.VerifyCursor, &m.VerifyRowsChecked, &m.VerifyMismatches,
		&m.Paused, &m.ApprovedPhase, &m.AbortRequested, &m.RollbackRequested, &m.Stats, &m.Error,
		&m.CreatedAt, &m.UpdatedAt, &m.PhaseStartedAt, &handover, &m.PassDone, &holdMS,
		&m.PrematureDetections, &m.AcceptedMismatches, &m.ForceApproved, &m.OldUsage, &m.Cutover)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: %q", ErrNoMigration, s.Name)
	}
	if err != nil {
		switch dbconn.SQLState(err) {
		case pgerrcode.UndefinedTable, pgerrcode.InvalidSchemaName:
			return nil, fmt.Errorf("%w: %q (the state schema cdcbackfill does not exist yet)", ErrNoMigration, s.Name)
		}
		return nil, fmt.Errorf("read state of %q: %w", s.Name, err)
	}
	if ranges != nil {
		if err := json.Unmarshal(ranges, &m.Ranges); err != nil {
			return nil, fmt.Errorf("decode ranges of %q: %w", s.Name, err)
		}
	}
	if handover != nil {
		lsn, err := pglogrepl.ParseLSN(*handover)
		if err != nil {
			return nil, fmt.Errorf("decode handover_lsn of %q: %w", s.Name, err)
		}
		m.HandoverLSN = &lsn
	}
	m.HoldProven = time.Duration(holdMS) * time.Millisecond
	return &m, nil
}

// Create inserts the state row in phase expand if it is missing.
func (s Store) Create(ctx context.Context, q dbconn.Querier) error {
	tag, err := q.Exec(ctx, `INSERT INTO cdcbackfill.migrations (name) VALUES ($1) ON CONFLICT (name) DO NOTHING`, s.Name)
	if err != nil {
		return fmt.Errorf("create state of %q: %w", s.Name, err)
	}
	if tag.RowsAffected() == 1 {
		return s.Event(ctx, q, Expand, "created", nil)
	}
	return nil
}

// Event appends to the event log.
func (s Store) Event(ctx context.Context, q dbconn.Querier, phase Phase, kind string, detail map[string]any) error {
	if detail == nil {
		detail = map[string]any{}
	}
	_, err := q.Exec(ctx, `INSERT INTO cdcbackfill.events (name, phase, kind, detail) VALUES ($1, $2, $3, $4)`,
		s.Name, phase, kind, detail)
	if err != nil {
		return fmt.Errorf("log event %s of %q: %w", kind, s.Name, err)
	}
	return nil
}

// Move moves the migration from phase from to phase to and logs it; it
// fails when the row is no longer in from.
func (s Store) Move(ctx context.Context, q dbconn.Querier, from, to Phase, detail map[string]any) error {
	return s.move(ctx, q, from, to, "", detail)
}

// move is Move with more to set in the same statement (set starts with ", ";
// its parameters start at $4).
func (s Store) move(ctx context.Context, q dbconn.Querier, from, to Phase, set string, detail map[string]any, args ...any) error {
	all := append([]any{s.Name, to, from}, args...)
	tag, err := q.Exec(ctx, `UPDATE cdcbackfill.migrations SET phase = $2, phase_started_at = now(), updated_at = now(),
		approved_phase = NULL`+set+` WHERE name = $1 AND phase = $3`, all...)
	if err != nil {
		return fmt.Errorf("move %q to phase %s: %w", s.Name, to, err)
	}
	if tag.RowsAffected() != 1 {
		return fmt.Errorf("move %q from phase %s to %s: the state row is no longer in %s", s.Name, from, to, from)
	}
	if detail == nil {
		detail = map[string]any{}
	}
	detail["from"] = from
	return s.Event(ctx, q, to, "phase", detail)
}

// update runs an UPDATE of the state row; only this package composes one.
func (s Store) update(ctx context.Context, q dbconn.Querier, set string, args ...any) error {
	all := append([]any{s.Name}, args...)
	if _, err := q.Exec(ctx, `UPDATE cdcbackfill.migrations SET `+set+`, updated_at = now() WHERE name = $1`, all...); err != nil {
		return fmt.Errorf("update state of %q: %w", s.Name, err)
	}
	return nil
}

// SetError records the last fatal error (nil clears it).
func (s Store) SetError(ctx context.Context, q dbconn.Querier, msg *string) error {
	return s.update(ctx, q, "error = $2", msg)
}

// StatementDone records, in the statement's own transaction, that n
// statements of phase's DDL list (expand, contract, or rollback for aborted)
// have run.
func (s Store) StatementDone(ctx context.Context, tx dbconn.Querier, phase Phase, n int) error {
	col := map[Phase]string{Expand: "expand_done", Contract: "contract_done", Aborted: "rollback_done"}[phase]
	if col == "" {
		return fmt.Errorf("state: phase %s has no DDL list", phase)
	}
	return s.update(ctx, tx, col+" = $2", n)
}

// SavePlan saves the backfill plan read in the slot's snapshot.
func (s Store) SavePlan(ctx context.Context, q dbconn.Querier, plan Plan, ranges []snapshot.Range, slotLSN string) error {
	return s.update(ctx, q, "plan = $2, ranges = $3, slot_lsn = $4::pg_lsn, rows_total = $5, rows_done = 0",
		plan, ranges, slotLSN, plan.Estimate)
}

// RecordBatch saves a backfill batch's cursor and count, and the keys the
// application held, in the batch's transaction.
func (s Store) RecordBatch(ctx context.Context, tx dbconn.Querier, worker int, r snapshot.Range, rows int64, held []recompute.Key) error {
	if err := s.update(ctx, tx, "ranges = jsonb_set(ranges, ARRAY[$2::text], $3::jsonb), rows_done = rows_done + $4",
		fmt.Sprint(worker), r, rows); err != nil {
		return err
	}
	for _, k := range held {
		if _, err := tx.Exec(ctx, `INSERT INTO cdcbackfill.retry_keys (name, key) VALUES ($1, $2) ON CONFLICT DO NOTHING`,
			s.Name, []string(k)); err != nil {
			return fmt.Errorf("save a held key: %w", err)
		}
	}
	return nil
}

// RetryKeys returns up to limit keys the backfill passed over.
func (s Store) RetryKeys(ctx context.Context, q dbconn.Querier, limit int) ([]recompute.Key, error) {
	rows, err := q.Query(ctx, `SELECT key FROM cdcbackfill.retry_keys WHERE name = $1 LIMIT $2`, s.Name, limit)
	if err != nil {
		return nil, fmt.Errorf("read held keys: %w", err)
	}
	keys, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (recompute.Key, error) {
		var k []string
		err := r.Scan(&k)
		return k, err
	})
	if err != nil {
		return nil, fmt.Errorf("read held keys: %w", err)
	}
	return keys, nil
}

// ForgetRetryKeys removes keys the backfill has now done.
func (s Store) ForgetRetryKeys(ctx context.Context, q dbconn.Querier, keys []recompute.Key) error {
	for _, k := range keys {
		if _, err := q.Exec(ctx, `DELETE FROM cdcbackfill.retry_keys WHERE name = $1 AND key = $2`, s.Name, []string(k)); err != nil {
			return fmt.Errorf("forget a held key: %w", err)
		}
	}
	return nil
}

// ForgetKeys removes the migration's retry keys and mismatches: nothing
// of them matters once it is done or aborted.
func (s Store) ForgetKeys(ctx context.Context, q dbconn.Querier) error {
	for _, t := range []string{"retry_keys", "mismatches"} {
		if _, err := q.Exec(ctx, `DELETE FROM cdcbackfill.`+t+` WHERE name = $1`, s.Name); err != nil {
			return fmt.Errorf("forget %s of %q: %w", t, s.Name, err)
		}
	}
	return nil
}

// PublishStats writes the live figures and adds the stream's new counts.
func (s Store) PublishStats(ctx context.Context, q dbconn.Querier, st Stats, newEvents, newFixes int64) error {
	return s.update(ctx, q, `stats = $2, sync_events = sync_events + $3, corrections = corrections + $4,
		last_correction_at = CASE WHEN $4 > 0 THEN now() ELSE last_correction_at END`, st, newEvents, newFixes)
}

// SetPaused pauses or resumes, and logs it.
func (s Store) SetPaused(ctx context.Context, q dbconn.Querier, phase Phase, paused bool) error {
	if err := s.update(ctx, q, "paused = $2", paused); err != nil {
		return err
	}
	return s.Event(ctx, q, phase, map[bool]string{true: "pause", false: "resume"}[paused], nil)
}

// Approve records an operator's approval of the step phase waits for;
// force approves a contract despite statements that still use the old
// column.
func (s Store) Approve(ctx context.Context, q dbconn.Querier, phase Phase, force bool) error {
	if err := s.update(ctx, q, "approved_phase = $2, force_approved = force_approved OR $3", phase, force); err != nil {
		return err
	}
	return s.Event(ctx, q, phase, "approve", map[string]any{"force": force})
}

// handoverLock is the key of the lock the hand-over takes exclusively and
// every correction of the daemon shares (recompute.Gate).
func (s Store) handoverLock() string {
	return "hashtextextended(" + dbconn.QuoteLiteral("cdcbackfill.handover:"+s.Name) + ", 0)"
}

// HandoverGate closes the daemon's corrections once this migration's
// hand-over is recorded (see recompute.Gate). Name is [a-z0-9_]: the
// literals are safe.
func (s Store) HandoverGate() *recompute.Gate {
	return &recompute.Gate{
		Lock:     "SELECT pg_advisory_xact_lock_shared(" + s.handoverLock() + ")",
		Handover: "SELECT handover_lsn::text FROM cdcbackfill.migrations WHERE name = " + dbconn.QuoteLiteral(s.Name),
	}
}

// HandoverWait bounds how long the hand-over waits for the corrections in
// flight (each one statement) to finish.
const HandoverWait = 30 * time.Second

// recordHandover runs set in a transaction that holds the hand-over lock
// exclusively: corrections in flight finish first, and none starts before
// it commits (durably, whatever the role's synchronous_commit). set
// returns the position it recorded.
func (s Store) recordHandover(ctx context.Context, conn *pgx.Conn, set func(tx pgx.Tx) (pglogrepl.LSN, error)) (pglogrepl.LSN, error) {
	var lsn pglogrepl.LSN
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := dbconn.SetLockTimeout(ctx, tx, HandoverWait, true); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = on"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock("+s.handoverLock()+")"); err != nil {
			if dbconn.IsLockTimeout(err) {
				return fmt.Errorf("the daemon's corrections did not pause within %s: %w", HandoverWait, err)
			}
			return err
		}
		var err error
		lsn, err = set(tx)
		return err
	})
	return lsn, err
}

// ErrNotInSync is returned by ApproveDualWrite when the migration has left
// sync.
var ErrNotInSync = errors.New("the migration is no longer in sync")

// ApproveDualWrite records the operator's approval of dual-write and, in
// the same transaction, the hand-over: the WAL insert position, before this
// transaction's commit, so every change committed after approve returns
// comes after it and is the application's. The daemon acts on it whenever
// it notices; its corrections stop at this commit (HandoverGate). A second
// approve keeps the first position.
func (s Store) ApproveDualWrite(ctx context.Context, conn *pgx.Conn) (pglogrepl.LSN, error) {
	return s.recordHandover(ctx, conn, func(tx pgx.Tx) (pglogrepl.LSN, error) {
		var text string
		err := tx.QueryRow(ctx, `UPDATE cdcbackfill.migrations SET approved_phase = 'sync',
			handover_lsn = coalesce(handover_lsn, pg_current_wal_insert_lsn()), updated_at = now()
			WHERE name = $1 AND phase = 'sync' RETURNING handover_lsn::text`, s.Name).Scan(&text)
		if errors.Is(err, pgx.ErrNoRows) {
			return 0, ErrNotInSync
		}
		if err != nil {
			return 0, fmt.Errorf("record the approval of %q: %w", s.Name, err)
		}
		lsn, err := pglogrepl.ParseLSN(text)
		if err != nil {
			return 0, err
		}
		return lsn, s.Event(ctx, tx, Sync, "approve", map[string]any{"handover_lsn": text})
	})
}

// HandOverNow moves sync to verify on the daemon's own decision (evidence
// of dual-write): the hand-over position is read and recorded in the
// transaction that makes the decision, under the hand-over lock.
func (s Store) HandOverNow(ctx context.Context, conn *pgx.Conn, detail map[string]any) (pglogrepl.LSN, error) {
	return s.recordHandover(ctx, conn, func(tx pgx.Tx) (pglogrepl.LSN, error) {
		var text string
		if err := tx.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&text); err != nil {
			return 0, err
		}
		lsn, err := pglogrepl.ParseLSN(text)
		if err != nil {
			return 0, err
		}
		return lsn, s.HandOver(ctx, tx, lsn, detail)
	})
}

// WithdrawApproval forgets an approval of phase, so that the step waits for
// the operator again, and logs why.
func (s Store) WithdrawApproval(ctx context.Context, q dbconn.Querier, phase Phase, detail map[string]any) error {
	if err := s.update(ctx, q, "approved_phase = NULL"); err != nil {
		return err
	}
	return s.Event(ctx, q, phase, "approval_withdrawn", detail)
}

// ErrTooLate is returned by RequestAbort once the contract DDL committed.
var ErrTooLate = errors.New("the contract DDL has committed")

// RequestAbort asks the daemon to abort, unless the contract DDL has
// committed. The test is in the UPDATE itself: the cut-over holds the state
// row locked from its last look at the abort flag to its commit, so an
// abort either lands before that look (and the cut-over rolls back) or
// finds contract_done set and fails with ErrTooLate.
func (s Store) RequestAbort(ctx context.Context, q dbconn.Querier, rollback bool) error {
	tag, err := q.Exec(ctx, `UPDATE cdcbackfill.migrations SET abort_requested = true, rollback_requested = $2, updated_at = now()
		WHERE name = $1 AND phase NOT IN ('done', 'aborted') AND NOT (phase = 'contract' AND contract_done > 0)`, s.Name, rollback)
	if err != nil {
		return fmt.Errorf("request abort of %q: %w", s.Name, err)
	}
	if tag.RowsAffected() == 0 {
		return ErrTooLate
	}
	return nil
}

// Restart sends the migration back to backfill with a fresh plan, for a
// new slot after the old one was lost.
func (s Store) Restart(ctx context.Context, tx dbconn.Querier, from Phase, walStatus string) error {
	if err := s.update(ctx, tx, `phase = 'backfill', phase_started_at = now(), plan = NULL, ranges = NULL,
		slot_lsn = NULL, rows_done = 0, rows_total = 0, verify_cursor = NULL, clean_since = NULL,
		verify_pass_started = NULL, clean_pass_started = NULL, approved_phase = NULL, error = NULL,
		handover_lsn = NULL, pass_done = false, hold_proven_ms = 0`); err != nil {
		return err
	}
	if err := s.ForgetKeys(ctx, tx); err != nil {
		return err
	}
	return s.Event(ctx, tx, Backfill, "recover", map[string]any{"from": from, "slot_wal_status": walStatus})
}

// HandOver moves sync to verify: from WAL position lsn the application
// owns the new columns. Verify starts with a fresh pass and no proven hold.
func (s Store) HandOver(ctx context.Context, q dbconn.Querier, lsn pglogrepl.LSN, detail map[string]any) error {
	detail["handover_lsn"] = lsn.String()
	return s.move(ctx, q, Sync, Verify, `, handover_lsn = $4::pg_lsn, pass_done = false, hold_proven_ms = 0,
		verify_cursor = NULL, old_usage = NULL`, detail, lsn.String())
}

// SetHandover records, for a migration that reached verify before the
// hand-over was recorded (an older daemon), that the application owns the
// new columns from lsn.
func (s Store) SetHandover(ctx context.Context, q dbconn.Querier, lsn pglogrepl.LSN) error {
	return s.update(ctx, q, "handover_lsn = $2::pg_lsn", lsn.String())
}

// BackToSync gives the new columns back to the expressions: the detection
// of dual-write was premature (a row needed a correction after it).
func (s Store) BackToSync(ctx context.Context, q dbconn.Querier, from Phase, detail map[string]any) error {
	if err := s.move(ctx, q, from, Sync, `, handover_lsn = NULL, pass_done = false, hold_proven_ms = 0,
		verify_cursor = NULL, premature_detections = premature_detections + 1, old_usage = NULL`, detail); err != nil {
		return err
	}
	_, err := q.Exec(ctx, `DELETE FROM cdcbackfill.mismatches WHERE name = $1`, s.Name)
	return err
}

// VerifyChunk records a verify chunk: rows scanned and the cursor (nil:
// the pass ended).
func (s Store) VerifyChunk(ctx context.Context, q dbconn.Querier, scanned int64, cursor recompute.Key) error {
	if cursor == nil {
		return s.update(ctx, q, "verify_rows_checked = verify_rows_checked + $2, verify_cursor = NULL, pass_done = true", scanned)
	}
	return s.update(ctx, q, "verify_rows_checked = verify_rows_checked + $2, verify_cursor = $3", scanned, []string(cursor))
}

// CreditHold adds d to the time proven clean.
func (s Store) CreditHold(ctx context.Context, q dbconn.Querier, d time.Duration) error {
	return s.update(ctx, q, "hold_proven_ms = hold_proven_ms + $2", d.Milliseconds())
}

// ResetHold starts the hold over: a row was found out of parity.
func (s Store) ResetHold(ctx context.Context, q dbconn.Querier) error {
	return s.update(ctx, q, "hold_proven_ms = 0, old_usage = NULL")
}

// BackToVerify moves contract back to verify: a row out of parity
// appeared before the contract DDL ran.
func (s Store) BackToVerify(ctx context.Context, q dbconn.Querier, detail map[string]any) error {
	return s.move(ctx, q, Contract, Verify, `, hold_proven_ms = 0, old_usage = NULL, force_approved = false`, detail)
}

// SetOldUsage saves what pg_stat_statements says of the old column(s).
func (s Store) SetOldUsage(ctx context.Context, q dbconn.Querier, u *OldUsage) error {
	return s.update(ctx, q, "old_usage = $2", u)
}

// FlushWAL commits, synchronously, a write of the state row: every WAL
// record inserted before it is then flushed, and walsenders are woken to
// send it. A transaction that writes nothing but its commit record would
// commit asynchronously and flush nothing.
func (s Store) FlushWAL(ctx context.Context, db interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}) error {
	tx, err := db.Begin(ctx)
	if err != nil {
		return fmt.Errorf("flush WAL: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = on"); err != nil {
		return fmt.Errorf("flush WAL: %w", err)
	}
	if err := s.update(ctx, tx, "paused = paused"); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("flush WAL: %w", err)
	}
	return nil
}

// LockForCutover locks the state row until the caller's transaction ends
// and returns whether an abort or a pause stands in the way.
func (s Store) LockForCutover(ctx context.Context, tx pgx.Tx) (abort, paused bool, err error) {
	err = tx.QueryRow(ctx, `SELECT abort_requested, paused FROM cdcbackfill.migrations WHERE name = $1 FOR UPDATE`, s.Name).Scan(&abort, &paused)
	if err != nil {
		return false, false, fmt.Errorf("lock the state row of %q: %w", s.Name, err)
	}
	return abort, paused, nil
}

// RecordCutover saves, in the cut-over's transaction, how many contract
// statements ran and what the cut-over cost so far.
func (s Store) RecordCutover(ctx context.Context, tx dbconn.Querier, done int, c Cutover) error {
	return s.update(ctx, tx, "contract_done = $2, cutover = $3", done, c)
}

// SaveCutover saves what the cut-over cost, measured once it committed.
func (s Store) SaveCutover(ctx context.Context, q dbconn.Querier, c Cutover) error {
	return s.update(ctx, q, "cutover = $2", c)
}
