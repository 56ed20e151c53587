package phases

import (
	"context"
	"errors"
	"time"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// StatusReport is the object `status --json` and GET /status print.
type StatusReport struct {
	Name     string  `json:"name"`
	Phase    string  `json:"phase"`
	Paused   bool    `json:"paused"`
	Running  bool    `json:"running"` // a daemon published a heartbeat in the last 5s
	Throttle string  `json:"throttle_reason"`
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
		// CorrectionSamples: keys the stream recently corrected, newest first.
		CorrectionSamples []string `json:"correction_samples"`
	} `json:"sync"`
	Verify struct {
		RowsChecked     int64    `json:"rows_checked"`
		Mismatches      int64    `json:"mismatches"`
		MismatchSamples []string `json:"mismatch_samples"`
	} `json:"verify"`
	PhaseStartedAt time.Time `json:"phase_started_at"`
	UpdatedAt      time.Time `json:"updated_at"`
}

// Status reads the migration's status from the database: it works with or
// without a daemon running. Slot lag is read live from the server.
func Status(ctx context.Context, cfg *config.Config) (*StatusReport, error) {
	conn, err := Connect(ctx, cfg.Database.DSN)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	r, err := statusOn(ctx, conn, cfg)
	if errors.Is(err, ErrNoMigration) {
		return nil, errors.New(err.Error() + "; it has not been started (cdcbackfill run)")
	}
	return r, err
}

// statusOn builds the status from the state row and the live slot.
func statusOn(ctx context.Context, conn recompute.Querier, cfg *config.Config) (*StatusReport, error) {
	st, err := Store{Name: cfg.Name}.Load(ctx, conn)
	if err != nil {
		return nil, err
	}
	r := &StatusReport{Name: st.Name, Phase: st.Phase, Paused: st.Paused, Error: st.Error,
		Throttle: st.Stats.ThrottleReason, PhaseStartedAt: st.PhaseStartedAt, UpdatedAt: st.UpdatedAt}
	if hb, err := time.Parse(time.RFC3339Nano, st.Stats.HeartbeatAt); err == nil {
		r.Running = time.Since(hb) < 5*time.Second
	}
	r.Backfill.RowsDone, r.Backfill.RowsTotal = st.RowsDone, st.RowsTotal
	if r.Running {
		r.Backfill.RowsPerSecond, r.Backfill.EtaSeconds = st.Stats.RowsPerSecond, st.Stats.EtaSeconds
	}
	r.Sync.Events, r.Sync.Corrections = st.SyncEvents, st.Corrections
	r.Sync.LagSeconds = st.Stats.LagSeconds
	r.Sync.CorrectionSamples = st.Stats.CorrectionSamples
	if r.Sync.CorrectionSamples == nil {
		r.Sync.CorrectionSamples = []string{}
	}
	if info, err := snapshot.LookupSlot(ctx, conn, cfg.SlotName()); err == nil && info.Exists {
		r.Sync.LagBytes, r.Sync.SlotStatus = info.LagBytes, info.WALStatus
	}
	r.Verify.RowsChecked, r.Verify.Mismatches = st.VerifyRowsChecked, st.VerifyMismatches
	r.Verify.MismatchSamples = st.MismatchSamples
	if r.Verify.MismatchSamples == nil {
		r.Verify.MismatchSamples = []string{}
	}
	return r, nil
}
