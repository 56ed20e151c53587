package snapshot

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/repeatlog"
)

// ThrottleConfig bounds the backfill (and verify) batches.
type ThrottleConfig struct {
	MaxRowsPerSecond float64 // 0: no cap
	// Standbys: replay lag in time and in bytes; 0: not checked (with
	// both 0, standbys are not watched). A physical slot whose standby is
	// not connected holds the batches whatever its size.
	MaxReplicaLag      time.Duration
	MaxReplicaLagBytes int64
	IgnoreSlots        []string // physical slots (or standbys' application_name) not watched
	MaxSlotLag         int64    // bytes; 0: not checked
	Slot               string
	CheckEvery         time.Duration // how often lags are read (default 1s)
	// Name ("backfill", "verify") and Logger: the throttle logs when it
	// starts holding batches back, with the reason, when the kind of
	// reason changes, a summary every LogEvery meanwhile (default
	// repeatlog.DefaultInterval), and when it stops, with how long.
	Name     string
	Logger   *slog.Logger // may be nil
	LogEvery time.Duration
}

// ReasonKind is what holds the batches back; a reason's text carries a
// figure that changes while its kind does not.
type ReasonKind string

const (
	ReasonNone                ReasonKind = ""
	ReasonPaused              ReasonKind = "paused"
	ReasonReplicaLag          ReasonKind = "replica lag"
	ReasonReplicaBytes        ReasonKind = "replica bytes"
	ReasonStandbyDisconnected ReasonKind = "standby disconnected"
	ReasonSlotLag             ReasonKind = "slot lag"
)

// Reason is why batches wait: its kind, and the text the operator reads.
type Reason struct {
	Kind ReasonKind
	Text string
}

// Throttle decides when the next batch may run: not while paused, not
// while a physical standby or the slot lags too far, or a standby's slot
// has no standby connected, and no faster than the row rate (a token
// bucket).
type Throttle struct {
	cfg     ThrottleConfig
	bounds  StandbyBounds
	q       dbconn.Querier
	paused  func() bool
	limiter *rate.Limiter
	rlog    *repeatlog.Log // nil without a Logger

	mu        sync.Mutex
	reason    Reason
	since     time.Time // when batches began to wait
	checkedAt time.Time
	lagReason Reason
}

// NewThrottle reads lags through q (used by one goroutine at a time: the
// throttle serializes its own reads). paused reports the operator's pause.
func NewThrottle(cfg ThrottleConfig, q dbconn.Querier, paused func() bool) *Throttle {
	if cfg.CheckEvery == 0 {
		cfg.CheckEvery = time.Second
	}
	th := &Throttle{cfg: cfg, q: q, paused: paused,
		bounds: StandbyBounds{MaxLag: cfg.MaxReplicaLag, MaxLagBytes: cfg.MaxReplicaLagBytes}}
	if cfg.MaxRowsPerSecond > 0 {
		th.limiter = rate.NewLimiter(rate.Limit(cfg.MaxRowsPerSecond), int(max(cfg.MaxRowsPerSecond, 1)))
	}
	if cfg.Logger != nil {
		th.rlog = repeatlog.New(cfg.Logger, cfg.LogEvery)
	}
	return th
}

// Reason says why batches wait now, or "" when they don't.
func (th *Throttle) Reason() string {
	th.mu.Lock()
	defer th.mu.Unlock()
	return th.reason.Text
}

// heldMsg is the line of a throttle that holds batches back: logged when
// it starts or its kind changes, then summarized every interval.
const heldMsg = ": throttled: batches wait"

// setReason records r and logs by its kind, not its text: a figure that
// moves (replica lag 3s, then 4s) is the same condition.
func (th *Throttle) setReason(r Reason) {
	th.mu.Lock()
	was, since := th.reason, th.since
	th.reason = r
	if was.Kind == ReasonNone && r.Kind != ReasonNone {
		th.since = time.Now()
	}
	th.mu.Unlock()
	if th.rlog == nil || was.Kind == ReasonNone && r.Kind == ReasonNone {
		return
	}
	msg := th.cfg.Name + heldMsg
	switch {
	case r.Kind == ReasonNone:
		// This line accounts for the whole wait: the repeats are not summarized.
		th.rlog.Forget(msg)
		th.cfg.Logger.Info(th.cfg.Name+": throttle released", "was", was.Text, "after", time.Since(since).Round(time.Millisecond))
	case was.Kind == ReasonNone:
		th.rlog.Info(msg, "reason", r.Text)
	case r.Kind != was.Kind:
		th.rlog.Forget(msg)
		th.rlog.Info(msg, "reason", r.Text, "was", was.Text, "for", time.Since(since).Round(time.Second))
	default:
		th.rlog.Info(msg, "reason", r.Text, "for", time.Since(since).Round(time.Second))
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
			th.stopped()
			return err
		}
		th.setReason(reason)
		if reason.Kind == ReasonNone {
			return nil
		}
		if err := dbconn.Sleep(ctx, 200*time.Millisecond); err != nil {
			th.stopped()
			return err
		}
	}
}

// stopped writes the last summary of a wait that ends with the caller
// (its context done, or an error), not with a release.
func (th *Throttle) stopped() {
	if th.rlog != nil {
		th.rlog.End()
	}
}

func (th *Throttle) blocked(ctx context.Context) (Reason, error) {
	if th.paused != nil && th.paused() {
		return Reason{ReasonPaused, "paused by operator (cdcbackfill resume)"}, nil
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
		return Reason{}, err
	}
	th.mu.Lock()
	th.checkedAt, th.lagReason = time.Now(), reason
	th.mu.Unlock()
	return reason, nil
}

func (th *Throttle) readLags(ctx context.Context) (Reason, error) {
	if th.bounds.MaxLag > 0 || th.bounds.MaxLagBytes > 0 {
		standbys, err := Standbys(ctx, th.q, th.cfg.IgnoreSlots)
		if err != nil {
			return Reason{}, err
		}
		if r, ok := worstStandby(th.bounds, standbys); ok {
			return r, nil
		}
	}
	if th.cfg.MaxSlotLag > 0 && th.cfg.Slot != "" {
		s, err := LookupSlot(ctx, th.q, th.cfg.Slot)
		if err != nil {
			return Reason{}, err
		}
		if s.LagBytes > th.cfg.MaxSlotLag {
			return Reason{ReasonSlotLag, fmt.Sprintf("slot lag %s > throttle.max_slot_lag %s", SizeText(s.LagBytes), SizeText(th.cfg.MaxSlotLag))}, nil
		}
	}
	return Reason{}, nil
}

// worstStandby is the reason of a disconnected standby first (it holds
// WAL and nothing measures it), else of the first that lags, saying how
// many others lag too.
func worstStandby(b StandbyBounds, standbys []Standby) (Reason, bool) {
	var reasons []Reason
	for _, s := range standbys {
		if r, ok := b.Lagging(s); ok {
			reasons = append(reasons, r)
		}
	}
	if len(reasons) == 0 {
		return Reason{}, false
	}
	worst := reasons[0]
	for _, r := range reasons {
		if r.Kind == ReasonStandbyDisconnected {
			worst = r
			break
		}
	}
	if n := len(reasons) - 1; n > 0 {
		worst.Text += fmt.Sprintf(" (and %d more standbys lag)", n)
	}
	return worst, true
}
