package snapshot

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// ThrottleConfig bounds the backfill (and verify) batches.
type ThrottleConfig struct {
	MaxRowsPerSecond float64       // 0: no cap
	MaxReplicaLag    time.Duration // 0: not checked
	MaxSlotLag       int64         // bytes; 0: not checked
	Slot             string
	CheckEvery       time.Duration // how often lags are read (default 1s)
	// Name ("backfill", "verify") and Logger: the throttle logs when it
	// starts holding batches back, with the reason, and when it stops.
	Name   string
	Logger *slog.Logger // may be nil
}

// Throttle decides when the next batch may run: not while paused, not
// while a physical standby or the slot lags too far, and no faster than the
// row rate (a token bucket).
type Throttle struct {
	cfg     ThrottleConfig
	q       dbconn.Querier
	paused  func() bool
	limiter *rate.Limiter

	mu        sync.Mutex
	reason    string
	since     time.Time // when reason began
	checkedAt time.Time
	lagReason string
}

// NewThrottle reads lags through q (used by one goroutine at a time: the
// throttle serializes its own reads). paused reports the operator's pause.
func NewThrottle(cfg ThrottleConfig, q dbconn.Querier, paused func() bool) *Throttle {
	if cfg.CheckEvery == 0 {
		cfg.CheckEvery = time.Second
	}
	th := &Throttle{cfg: cfg, q: q, paused: paused}
	if cfg.MaxRowsPerSecond > 0 {
		th.limiter = rate.NewLimiter(rate.Limit(cfg.MaxRowsPerSecond), int(max(cfg.MaxRowsPerSecond, 1)))
	}
	return th
}

// Reason says why batches wait now, or "" when they don't.
func (th *Throttle) Reason() string {
	th.mu.Lock()
	defer th.mu.Unlock()
	return th.reason
}

func (th *Throttle) setReason(r string) {
	th.mu.Lock()
	was, since := th.reason, th.since
	if r != was {
		th.reason, th.since = r, time.Now()
	}
	th.mu.Unlock()
	if r == was || th.cfg.Logger == nil {
		return
	}
	switch {
	case r == "":
		th.cfg.Logger.Info(th.cfg.Name+": throttle released", "was", was, "after", time.Since(since).Round(time.Millisecond))
	case was == "":
		th.cfg.Logger.Info(th.cfg.Name+": throttled: batches wait", "reason", r)
	default:
		th.cfg.Logger.Info(th.cfg.Name+": still throttled, for another reason", "reason", r, "was", was)
	}
}

// Wait blocks until a batch of rows may run. It returns ctx.Err() when ctx
// ends first.
func (th *Throttle) Wait(ctx context.Context, rows int) error {
	if err := th.waitUnblocked(ctx); err != nil {
		return err
	}
	if th.limiter == nil {
		return nil
	}
	// A batch may be bigger than the bucket: take it in bucket-sized bites.
	for rows > 0 {
		n := min(rows, th.limiter.Burst())
		if err := th.limiter.WaitN(ctx, n); err != nil {
			return ctx.Err()
		}
		rows -= n
	}
	// The rate's wait may have been long: a pause (or a lag) that came
	// meanwhile holds this batch too.
	return th.waitUnblocked(ctx)
}

func (th *Throttle) waitUnblocked(ctx context.Context) error {
	for {
		reason, err := th.blocked(ctx)
		if err != nil {
			return err
		}
		th.setReason(reason)
		if reason == "" {
			return nil
		}
		if err := dbconn.Sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
}

func (th *Throttle) blocked(ctx context.Context) (string, error) {
	if th.paused != nil && th.paused() {
		return "paused by operator (cdcbackfill resume)", nil
	}
	th.mu.Lock()
	fresh := time.Since(th.checkedAt) < th.cfg.CheckEvery
	cached := th.lagReason
	th.mu.Unlock()
	if fresh {
		return cached, nil
	}
	reason, err := th.readLags(ctx)
	if err != nil {
		return "", err
	}
	th.mu.Lock()
	th.checkedAt, th.lagReason = time.Now(), reason
	th.mu.Unlock()
	return reason, nil
}

// replicaLagSQL reads the largest replay lag of physical standbys: logical
// walsenders (ours among them) are not standbys.
const replicaLagSQL = `SELECT COALESCE(EXTRACT(epoch FROM max(replay_lag)), 0)::float8 FROM pg_stat_replication
WHERE pid NOT IN (SELECT active_pid FROM pg_replication_slots WHERE slot_type = 'logical' AND active_pid IS NOT NULL)`

func (th *Throttle) readLags(ctx context.Context) (string, error) {
	if th.cfg.MaxReplicaLag > 0 {
		var secs float64
		if err := th.q.QueryRow(ctx, replicaLagSQL).Scan(&secs); err != nil {
			return "", fmt.Errorf("read replica lag: %w", err)
		}
		lag := time.Duration(secs * float64(time.Second))
		if lag > th.cfg.MaxReplicaLag {
			return fmt.Sprintf("replica lag %s > throttle.max_replica_lag %s", lag.Round(time.Millisecond), th.cfg.MaxReplicaLag), nil
		}
	}
	if th.cfg.MaxSlotLag > 0 && th.cfg.Slot != "" {
		s, err := LookupSlot(ctx, th.q, th.cfg.Slot)
		if err != nil {
			return "", err
		}
		if s.LagBytes > th.cfg.MaxSlotLag {
			return fmt.Sprintf("slot lag %d bytes > throttle.max_slot_lag %d bytes", s.LagBytes, th.cfg.MaxSlotLag), nil
		}
	}
	return "", nil
}
