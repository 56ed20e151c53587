package phases

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// Phase names, as stored in cdcbackfill.migrations.phase.
const (
	Expand   = "expand"
	Backfill = "backfill"
	Sync     = "sync"
	Verify   = "verify"
	Contract = "contract"
	Done     = "done"
	Aborted  = "aborted"
)

// schemaSQL creates the state store. Idempotent, run on every start.
const schemaSQL = `
CREATE SCHEMA IF NOT EXISTS cdcbackfill;
CREATE TABLE IF NOT EXISTS cdcbackfill.migrations (
	name text PRIMARY KEY,
	phase text NOT NULL DEFAULT 'expand',
	expand_done int NOT NULL DEFAULT 0,
	contract_done int NOT NULL DEFAULT 0,
	rollback_done int NOT NULL DEFAULT 0,
	slot_lsn pg_lsn,
	plan jsonb,
	ranges jsonb,
	rows_done bigint NOT NULL DEFAULT 0,
	rows_total bigint NOT NULL DEFAULT 0,
	sync_events bigint NOT NULL DEFAULT 0,
	corrections bigint NOT NULL DEFAULT 0,
	last_correction_at timestamptz,
	verify_cursor text[],
	verify_rows_checked bigint NOT NULL DEFAULT 0,
	verify_mismatches bigint NOT NULL DEFAULT 0,
	mismatch_samples text[] NOT NULL DEFAULT '{}',
	clean_since timestamptz,
	paused boolean NOT NULL DEFAULT false,
	approved_phase text,
	abort_requested boolean NOT NULL DEFAULT false,
	rollback_requested boolean NOT NULL DEFAULT false,
	stats jsonb NOT NULL DEFAULT '{}',
	error text,
	created_at timestamptz NOT NULL DEFAULT now(),
	updated_at timestamptz NOT NULL DEFAULT now(),
	phase_started_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS cdcbackfill.events (
	id bigserial PRIMARY KEY,
	name text NOT NULL,
	at timestamptz NOT NULL DEFAULT now(),
	phase text NOT NULL,
	kind text NOT NULL,
	detail jsonb NOT NULL DEFAULT '{}'
);
ALTER TABLE cdcbackfill.migrations
	ADD COLUMN IF NOT EXISTS verify_pass_started timestamptz,
	ADD COLUMN IF NOT EXISTS clean_pass_started timestamptz;
CREATE TABLE IF NOT EXISTS cdcbackfill.retry_keys (
	name text NOT NULL,
	key text[] NOT NULL,
	PRIMARY KEY (name, key)
);`

// Plan is what the backfill covers, as saved in the state row.
type Plan struct {
	snapshot.Plan
	// Recovered is set when the plan was read after the slot existed but
	// without its snapshot (a crash between the two); see snapshot.ReadPlanNow.
	Recovered bool `json:"recovered,omitempty"`
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
	Leader            string   `json:"leader,omitempty"`
	HeartbeatAt       string   `json:"heartbeat_at,omitempty"`
}

// State is one row of cdcbackfill.migrations.
type State struct {
	Name              string
	Phase             string
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
	VerifyMismatches  int64
	MismatchSamples   []string
	CleanSince        *time.Time
	Paused            bool
	ApprovedPhase     *string
	AbortRequested    bool
	RollbackRequested bool
	Stats             Stats
	Error             *string
	CreatedAt         time.Time
	UpdatedAt         time.Time
	PhaseStartedAt    time.Time
	// VerifyPassStarted is when the verify pass in hand began;
	// CleanPassStarted when the last pass without a mismatch began.
	VerifyPassStarted *time.Time
	CleanPassStarted  *time.Time
}

// ErrNoMigration is returned when no state row exists for the name.
var ErrNoMigration = errors.New("no migration of that name")

// Store reads and writes the state of one migration.
type Store struct {
	Name string
}

// EnsureSchema creates the state store if it is missing.
func EnsureSchema(ctx context.Context, q recompute.Querier) error {
	if _, err := q.Exec(ctx, schemaSQL); err != nil {
		return fmt.Errorf("create state schema cdcbackfill: %w", err)
	}
	return nil
}

const selectState = `SELECT name, phase, expand_done, contract_done, rollback_done, slot_lsn::text,
	plan, ranges, rows_done, rows_total, sync_events, corrections, last_correction_at,
	verify_cursor, verify_rows_checked, verify_mismatches, mismatch_samples, clean_since,
	paused, approved_phase, abort_requested, rollback_requested, stats, error,
	created_at, updated_at, phase_started_at, verify_pass_started, clean_pass_started
FROM cdcbackfill.migrations WHERE name = $1`

// Load reads the state row; ErrNoMigration when there is none.
func (s Store) Load(ctx context.Context, q recompute.Querier) (*State, error) {
	var st State
	var ranges []byte
	err := q.QueryRow(ctx, selectState, s.Name).Scan(&st.Name, &st.Phase, &st.ExpandDone, &st.ContractDone,
		&st.RollbackDone, &st.SlotLSN, &st.Plan, &ranges, &st.RowsDone, &st.RowsTotal, &st.SyncEvents,
		&st.Corrections, &st.LastCorrectionAt, &st.VerifyCursor, &st.VerifyRowsChecked, &st.VerifyMismatches,
		&st.MismatchSamples, &st.CleanSince, &st.Paused, &st.ApprovedPhase, &st.AbortRequested,
		&st.RollbackRequested, &st.Stats, &st.Error, &st.CreatedAt, &st.UpdatedAt, &st.PhaseStartedAt,
		&st.VerifyPassStarted, &st.CleanPassStarted)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: %q", ErrNoMigration, s.Name)
	}
	if err != nil {
		if isUndefinedTable(err) {
			return nil, fmt.Errorf("%w: %q (the state schema cdcbackfill does not exist yet)", ErrNoMigration, s.Name)
		}
		return nil, fmt.Errorf("read state of %q: %w", s.Name, err)
	}
	if ranges != nil {
		if err := json.Unmarshal(ranges, &st.Ranges); err != nil {
			return nil, fmt.Errorf("decode ranges of %q: %w", s.Name, err)
		}
	}
	return &st, nil
}

// Create inserts the state row in phase expand if it is missing.
func (s Store) Create(ctx context.Context, q recompute.Querier) error {
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
func (s Store) Event(ctx context.Context, q recompute.Querier, phase, kind string, detail map[string]any) error {
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

// SetPhase moves the migration to phase and logs it.
func (s Store) SetPhase(ctx context.Context, q recompute.Querier, from, to string, detail map[string]any) error {
	tag, err := q.Exec(ctx, `UPDATE cdcbackfill.migrations SET phase = $2, phase_started_at = now(), updated_at = now(),
		approved_phase = NULL WHERE name = $1 AND phase = $3`, s.Name, to, from)
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

// Update runs an UPDATE of the state row: set is the SET list, args start
// at $2 ($1 is the name).
func (s Store) Update(ctx context.Context, q recompute.Querier, set string, args ...any) error {
	all := append([]any{s.Name}, args...)
	if _, err := q.Exec(ctx, `UPDATE cdcbackfill.migrations SET `+set+`, updated_at = now() WHERE name = $1`, all...); err != nil {
		return fmt.Errorf("update state of %q: %w", s.Name, err)
	}
	return nil
}
