package phases

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/metrics"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// observer is what the operator's window (metrics.Server) reads: it lives
// for the whole process, across restarts of the daemon after a lost
// database, and reads the figures from the state row like `status` does.
type observer struct {
	cfg          *config.Config
	pool         *pgxpool.Pool
	leader       atomic.Bool
	standby      atomic.Bool
	lastProgress atomic.Int64 // unix nanoseconds of the watcher's last good tick
	ddlRetries   atomic.Int64
}

func (o *observer) progressed() { o.lastProgress.Store(time.Now().UnixNano()) }

// snapshot is the metrics.Source.
func (o *observer) snapshot(ctx context.Context) (metrics.Snapshot, error) {
	snap := metrics.Snapshot{Leader: o.leader.Load(), Standby: o.standby.Load(), DDLRetries: o.ddlRetries.Load()}
	if ns := o.lastProgress.Load(); ns != 0 {
		snap.LastProgress = time.Unix(0, ns)
	}
	r, err := statusOn(ctx, o.pool, o.cfg)
	if errors.Is(err, state.ErrNoMigration) {
		return snap, nil // not started yet: the figures are zero
	}
	if err != nil {
		return snap, err
	}
	snap.Phase, snap.Paused, snap.ThrottleReason = string(r.Phase), r.Paused, r.Throttle
	snap.RowsDone, snap.RowsTotal = r.Backfill.RowsDone, r.Backfill.RowsTotal
	snap.RowsPerSecond, snap.EtaSeconds = r.Backfill.RowsPerSecond, r.Backfill.EtaSeconds
	snap.SlotLagBytes, snap.ApplyLagSeconds = r.Sync.LagBytes, r.Sync.LagSeconds
	snap.DeferredKeys = int64(r.Sync.DeferredKeys)
	snap.StreamEvents, snap.Corrections = r.Sync.Events, r.Sync.Corrections
	snap.VerifyRowsChecked, snap.VerifyMismatches = r.Verify.RowsChecked, r.Verify.Mismatches
	snap.MismatchesFound, snap.PrematureDetections = r.Verify.MismatchesFound, int64(r.Verify.PrematureDetections)
	snap.HoldProvenSeconds = r.Verify.HoldProven
	if dw := r.Sync.DualWrite; dw != nil {
		snap.DualWriteEvidence = int64(dw.Evidence)
	}
	if c := r.Contract.Cutover; c != nil {
		snap.CutoverStallSeconds = c.LongestStallMS / 1000
	}
	snap.Status = r
	return snap, nil
}

// serve starts the HTTP window when http.listen is set; the returned stop
// function shuts it down.
func serve(ctx context.Context, cfg *config.Config, log *slog.Logger) (*observer, func(), error) {
	o := &observer{cfg: cfg}
	if cfg.HTTP.Listen == "" {
		return o, func() {}, nil
	}
	pcfg, err := pgxpool.ParseConfig(cfg.Database.DSN)
	if err != nil {
		return nil, nil, errors.New("database.dsn does not parse")
	}
	pcfg.MaxConns = 2 // scrapes are small and rare
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, nil, err
	}
	o.pool = pool
	srv := metrics.NewServer(cfg.HTTP.Listen, o.snapshot, log)
	if err := srv.Start(); err != nil {
		pool.Close()
		return nil, nil, err
	}
	log.Info("serving /metrics /healthz /readyz /status", "listen", srv.Addr())
	return o, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		pool.Close()
	}, nil
}
