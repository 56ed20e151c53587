package preflight

import (
	"testing"

	"github.com/cdcbackfill/cdcbackfill/config"
)

func TestCheckStandbys(t *testing.T) {
	in := inspect(t, usersTable, func(c *config.Config) { c.Throttle.MaxReplicaLag, c.Throttle.MaxReplicaLagBytes = 0, 0 })
	run(t, in, checkStandbys)
	has(t, in.r, OK, "standbys: not watched")

	in = inspect(t, usersTable, func(c *config.Config) { c.Throttle.IgnoreSlots = []string{"no_such_slot"} })
	run(t, in, checkStandbys)
	if in.cfg.Throttle.MaxReplicaLag > 0 || in.cfg.Throttle.MaxReplicaLagBytes > 0 {
		has(t, in.r, Warn, `"no_such_slot" is neither a physical slot nor a standby here`)
	}
}
