package preflight

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

func checkReplication(ctx context.Context, in *inspection) (bool, error) {
	r, conn, cfg := in.r, in.conn, in.cfg
	var super, repl bool
	if err := conn.QueryRow(ctx, `SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user`).Scan(&super, &repl); err != nil {
		r.fail("role", err.Error(), "")
		return false, nil
	}
	if super || repl {
		r.ok("role may replicate")
	} else {
		r.fail("role", "the role has neither REPLICATION nor SUPERUSER and cannot create or read a replication slot",
			"ALTER ROLE <role> REPLICATION")
	}

	var exists, active bool
	var slotDB *string
	err := conn.QueryRow(ctx, `SELECT true, active, database FROM pg_replication_slots WHERE slot_name = $1`, cfg.SlotName()).Scan(&exists, &active, &slotDB)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		r.fail("replication slot", err.Error(), "")
		return false, nil
	}
	owned := r.State != nil && r.State.SlotLSN != nil && !r.State.Phase.Ended()
	switch {
	case exists && !owned:
		r.fail("replication slot", fmt.Sprintf("a replication slot named %q already exists and is not this migration's", cfg.SlotName()),
			fmt.Sprintf("choose another `name`, or drop the slot if it is left over: SELECT pg_drop_replication_slot('%s')", cfg.SlotName()))
	case exists:
		r.ok(fmt.Sprintf("replication slot %s exists (this migration's)", cfg.SlotName()))
	default:
		var free int
		if err := conn.QueryRow(ctx, `SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)`).Scan(&free); err != nil {
			r.fail("replication slot", err.Error(), "")
			return false, nil
		}
		if free < 1 {
			r.fail("replication slot", "no replication slot is free (max_replication_slots is used up)",
				"drop an unused slot, or raise max_replication_slots and restart PostgreSQL")
		} else {
			r.ok(fmt.Sprintf("a replication slot is free (%d free)", free))
		}
	}
	var keep string
	if err := conn.QueryRow(ctx, `SHOW max_slot_wal_keep_size`).Scan(&keep); err == nil && keep == "-1" {
		r.warn("max_slot_wal_keep_size", "is unlimited: a daemon that stops for good leaves a slot that holds WAL until the disk fills",
			"ALTER SYSTEM SET max_slot_wal_keep_size = '50GB' (a size your disk can hold); SELECT pg_reload_conf()")
	}
	return false, nil
}
