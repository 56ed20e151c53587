package phases

import (
	"context"
	"errors"
	"time"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// StatusReport is the object `status --json` and GET /status print.
type StatusReport struct {
	Name   string      `json:"name"`
	Phase  state.Phase `json:"phase"`
	Paused bool        `json:"paused"`
	// Running: a daemon holds the migration's leader lock now.
	Running  bool    `json:"running"`
	Throttle string  `json:"throttle_reason"`
	Waiting  string  `json:"waiting"` // what the phase waits for, in a sentence
	Error    *string `json:"error"`
	Backfill struct {
		RowsDone      int64   `json:"rows_done"`
		RowsTotal     int64   `json:"rows_total"`
		RowsPerSecond float64 `json:"rows_per_second"`
		EtaSeconds    float64 `json:"eta_seconds"`
	} `json:"backfill"`
	Sync struct {
		LagBytes    int64   `json:"lag_bytes"`
		LagSeconds  float64 `json:"lag_seconds"`
		Events      int64   `json:"events"`
		Corrections int64   `json:"corrections"`
		SlotStatus  string  `json:"slot_wal_status,omitempty"`
		// Correction is sync.correction; in the deferred mode DeferredKeys
		// is the backlog of changed keys waiting, the oldest of them
		// LagSeconds old (at most sync.defer_for).
		Correction   config.Correction `json:"correction"`
		DeferredKeys int               `json:"deferred_keys"`
		DeferFor     float64           `json:"defer_for_seconds,omitempty"`
		// CorrectionSamples: keys the stream recently corrected, newest first.
		CorrectionSamples []string `json:"correction_samples"`
		// DualWrite: how far the evidence of dual-write has come (detect auto).
		DualWrite *state.DualWrite `json:"dual_write,omitempty"`
	} `json:"sync"`
	Verify struct {
		RowsChecked int64 `json:"rows_checked"`
		// Mismatches are the rows out of parity now, not accepted: they hold
		// the contract. MismatchesFound counts every one ever found.
		Mismatches      int64            `json:"mismatches"`
		MismatchesFound int64            `json:"mismatches_found"`
		Accepted        int64            `json:"mismatches_accepted"`
		MismatchSamples []MismatchSample `json:"mismatch_samples"`
		PassDone        bool             `json:"pass_done"`
		HoldProven      float64          `json:"hold_proven_seconds"`
		Hold            float64          `json:"hold_seconds"`
		// PrematureDetections: auto-detected dual-writes a later correction
		// proved wrong (each sent the migration back to sync).
		PrematureDetections int `json:"premature_detections"`
		// OldColumnStatements ran during the hold and use the old column
		// without the new ones (pg_stat_statements).
		OldColumnStatements []state.UsedBy `json:"old_column_statements,omitempty"`
	} `json:"verify"`
	Contract struct {
		Cutover *state.Cutover `json:"cutover,omitempty"`
	} `json:"contract"`
	PhaseStartedAt time.Time `json:"phase_started_at"`
	UpdatedAt      time.Time `json:"updated_at"`
}

// MismatchSample is one row out of parity, with what it holds and what
// the expressions give, per differing column.
type MismatchSample struct {
	Key      string            `json:"key"`
	Columns  map[string]Values `json:"columns"`
	Accepted bool              `json:"accepted,omitempty"`
}

// Values are a new column's value in the row and its expression's.
type Values struct {
	Actual   *string `json:"actual"`
	Expected *string `json:"expected"`
}

// Status reads the migration's status from the database: it works with or
// without a daemon running. Slot lag is read live from the server.
func Status(ctx context.Context, cfg *config.Config) (*StatusReport, error) {
	conn, err := dbconn.Connect(ctx, cfg.Database.DSN)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	r, err := statusOn(ctx, conn, cfg)
	if errors.Is(err, state.ErrNoMigration) {
		return nil, errors.New(err.Error() + "; it has not been started (cdcbackfill run)")
	}
	return r, err
}

// statusOn builds the status from the state row and the live slot.
func statusOn(ctx context.Context, conn dbconn.Querier, cfg *config.Config) (*StatusReport, error) {
	store := state.Store{Name: cfg.Name}
	st, err := store.Load(ctx, conn)
	if err != nil {
		return nil, err
	}
	r := &StatusReport{Name: st.Name, Phase: st.Phase, Paused: st.Paused, Error: st.Error,
		PhaseStartedAt: st.PhaseStartedAt, UpdatedAt: st.UpdatedAt}
	if r.Running, err = dbconn.LeaderRunning(ctx, conn, cfg.Name); err != nil {
		return nil, err
	}
	r.Backfill.RowsDone, r.Backfill.RowsTotal = st.RowsDone, st.RowsTotal
	if r.Running {
		// Rates and what the daemon waits for are its live figures: stale
		// once it is gone.
		r.Backfill.RowsPerSecond, r.Backfill.EtaSeconds = st.Stats.RowsPerSecond, st.Stats.EtaSeconds
		r.Throttle, r.Waiting = st.Stats.ThrottleReason, st.Stats.Waiting
		r.Sync.LagSeconds = st.Stats.LagSeconds
		r.Sync.DeferredKeys = st.Stats.DeferredKeys
		r.Sync.DualWrite = st.Stats.DualWrite
	} else if !st.Phase.Ended() {
		r.Waiting = "a daemon: none runs this migration (cdcbackfill run)"
	}
	r.Sync.Events, r.Sync.Corrections = st.SyncEvents, st.Corrections
	r.Sync.Correction = cfg.Sync.Correction
	if cfg.Sync.Correction == config.CorrectionDeferred {
		r.Sync.DeferFor = cfg.Sync.DeferFor.Seconds()
	}
	r.Sync.CorrectionSamples = st.Stats.CorrectionSamples
	if r.Sync.CorrectionSamples == nil {
		r.Sync.CorrectionSamples = []string{}
	}
	if info, err := snapshot.LookupSlot(ctx, conn, cfg.SlotName()); err == nil && info.Exists {
		r.Sync.LagBytes, r.Sync.SlotStatus = info.LagBytes, info.WALStatus
	}
	v := &r.Verify
	v.RowsChecked, v.MismatchesFound, v.Accepted = st.VerifyRowsChecked, st.VerifyMismatches, st.AcceptedMismatches
	v.PassDone, v.HoldProven, v.Hold = st.PassDone, st.HoldProven.Seconds(), cfg.ContractPolicy.Hold.Seconds()
	v.PrematureDetections = st.PrematureDetections
	if st.OldUsage != nil {
		v.OldColumnStatements = st.OldUsage.Still
	}
	v.MismatchSamples = []MismatchSample{}
	n, rows, err := store.Outstanding(ctx, conn, 10)
	if err != nil {
		return nil, err
	}
	v.Mismatches = n
	if len(rows) > 0 {
		names, _ := recompute.KeyNamesOf(ctx, conn, cfg.QuotedTable())
		for _, m := range rows {
			v.MismatchSamples = append(v.MismatchSamples, sample(cfg, names, m))
		}
	}
	r.Contract.Cutover = st.Cutover
	return r, nil
}

// sample renders a kept row for status: its key as PostgreSQL prints one,
// and the columns that differ.
func sample(cfg *config.Config, keyNames []string, m state.MismatchRow) MismatchSample {
	s := MismatchSample{Key: recompute.FormatKey(keyNames, m.Key), Columns: map[string]Values{}, Accepted: m.Accepted}
	for i, c := range cfg.Columns {
		if i >= len(m.Actual) || i >= len(m.Expected) {
			break
		}
		if differs(m.Actual[i], m.Expected[i]) {
			s.Columns[c.Name] = Values{Actual: m.Actual[i], Expected: m.Expected[i]}
		}
	}
	return s
}
