package preflight

import (
	"context"
	"fmt"
	"strings"

	"github.com/cdcbackfill/cdcbackfill/snapshot"
)

// checkStandbys says which physical standbys and slots the throttle
// watches, and which it ignores: a slot with no standby connected holds
// the backfill (fail closed), so plan names it before run does.
func checkStandbys(ctx context.Context, in *inspection) (bool, error) {
	r, cfg := in.r, in.cfg.Throttle
	bounds := snapshot.StandbyBounds{MaxLag: cfg.MaxReplicaLag, MaxLagBytes: cfg.MaxReplicaLagBytes}
	if bounds.MaxLag == 0 && bounds.MaxLagBytes == 0 {
		r.ok("standbys: not watched (throttle.max_replica_lag and throttle.max_replica_lag_bytes are 0)")
		return false, nil
	}
	standbys, err := snapshot.Standbys(ctx, in.conn, cfg.IgnoreSlots)
	if err != nil {
		r.fail("standbys", err.Error(), "")
		return false, nil
	}
	if len(standbys) == 0 {
		r.ok("standbys: none (no physical replication slot or standby); the throttle watches any that appear")
	}
	seen := map[string]bool{}
	for _, s := range standbys {
		seen[s.Label()] = true
		what := describeStandby(s)
		if s.Ignored {
			r.ok(what + ": ignored (throttle.ignore_slots)")
			continue
		}
		if reason, lagging := bounds.Lagging(s); lagging {
			r.warn("standby "+s.Label(), "the backfill would wait now: "+reason.Text, "")
			continue
		}
		r.ok(what + ": watched (" + watchedBounds(bounds) + ")")
	}
	for _, name := range cfg.IgnoreSlots {
		if !seen[name] {
			r.warn("throttle.ignore_slots", fmt.Sprintf("%q is neither a physical slot nor a standby here", name), "remove it from throttle.ignore_slots, or check the name")
		}
	}
	return false, nil
}

func describeStandby(s snapshot.Standby) string {
	var b strings.Builder
	switch {
	case s.Slot != "" && s.Connected:
		fmt.Fprintf(&b, "standby %q on slot %s, connected, replay %s behind, slot holds %s", s.Name, s.Slot, snapshot.SizeText(s.ReplayBytes), snapshot.SizeText(s.Retained))
	case s.Slot != "":
		fmt.Fprintf(&b, "physical slot %s, no standby connected, holds %s", s.Slot, snapshot.SizeText(s.Retained))
	default:
		fmt.Fprintf(&b, "standby %q without a slot, replay %s behind", s.Name, snapshot.SizeText(s.ReplayBytes))
	}
	return b.String()
}

func watchedBounds(b snapshot.StandbyBounds) string {
	var parts []string
	if b.MaxLag > 0 {
		parts = append(parts, "throttle.max_replica_lag "+b.MaxLag.String())
	}
	if b.MaxLagBytes > 0 {
		parts = append(parts, "throttle.max_replica_lag_bytes "+snapshot.SizeText(b.MaxLagBytes))
	}
	return strings.Join(parts, ", ")
}
