package preflight

import (
	"context"
	"fmt"

	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
)

// checkServerFeatures says what the server's version gives the stream:
// where the daemon's own writes are filtered, what a failover does to the
// slot, and whether an idle slot can be invalidated.
func checkServerFeatures(ctx context.Context, in *inspection) (bool, error) {
	r, conn, cfg, t := in.r, in.conn, in.cfg, in.table
	if _, why, err := pgfeature.OriginNone(ctx, conn, cfg.Sync.OriginFilter, t.Ident()); err != nil {
		r.fail("stream", err.Error(), "")
	} else {
		r.ok("stream: " + why)
	}
	if failover, why, err := pgfeature.FailoverSlot(ctx, conn); err != nil {
		r.fail("failover", err.Error(), "")
	} else if failover {
		r.ok("failover: " + why)
	} else {
		r.info("failover", why, "")
	}
	if idle, err := pgfeature.IdleSlotTimeout(ctx, conn); err != nil {
		r.fail("idle slot timeout", err.Error(), "")
	} else if idle != "" {
		r.warn("idle slot timeout", fmt.Sprintf("idle_replication_slot_timeout is %s: a slot no daemon reads for that long is invalidated, and `cdcbackfill recover` must then backfill again", idle),
			"keep a daemon running (systemd Restart=on-failure, a standby daemon), or raise idle_replication_slot_timeout for the migration")
	}
	return false, nil
}
