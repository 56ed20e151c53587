package snapshot

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
)

// Standby is one physical replica the throttle watches: a walsender of
// pg_stat_replication that is not a logical slot's, a physical replication
// slot, or both (a connected standby streaming from its slot).
type Standby struct {
	Slot      string // physical slot; "" for a standby streaming without one
	Name      string // application_name of its walsender; "" when not connected
	Connected bool   // a walsender serves it
	// Measured: the walsender's positions are readable (they are NULL for
	// a role without pg_read_all_stats, or before the first reply).
	Measured bool
	// ReplayLag is pg_stat_replication.replay_lag: only updated while
	// replay moves, NULL (0 here) once the standby is idle and caught up.
	ReplayLag time.Duration
	// ReplayBytes is how far replay is behind pg_current_wal_lsn().
	ReplayBytes int64
	// Retained is the WAL the slot holds back (pg_current_wal_lsn() -
	// restart_lsn); 0 for no slot, or a slot that reserved none yet.
	Retained int64
	Ignored  bool // in throttle.ignore_slots
}

// Label names the standby for the operator: its slot, else its
// application_name.
func (s Standby) Label() string {
	if s.Slot != "" {
		return s.Slot
	}
	return s.Name
}

// standbysSQL lists physical standbys: each physical slot with the
// walsender serving it, if any, and each physical walsender without a slot.
// A slot marked active whose walsender is gone from pg_stat_replication is
// not connected. A physical walsender is connected to no database: logical
// ones (the daemon's own among them) are not standbys, nor is the base
// backup a walsender sends.
const standbysSQL = `WITH phys AS (
  SELECT r.pid, r.application_name, r.state, r.replay_lag,
         pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::int8 AS replay_bytes
  FROM pg_stat_replication r JOIN pg_stat_activity a ON a.pid = r.pid
  WHERE a.datid IS NULL AND r.state IS DISTINCT FROM 'backup'
)
SELECT s.slot_name::text, COALESCE(p.application_name, ''), p.pid IS NOT NULL, p.state IS NOT NULL AND p.replay_bytes IS NOT NULL,
       COALESCE(EXTRACT(epoch FROM p.replay_lag), 0)::float8, COALESCE(p.replay_bytes, 0),
       COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn), 0)::int8
FROM pg_replication_slots s LEFT JOIN phys p ON s.active AND p.pid = s.active_pid
WHERE s.slot_type = 'physical'
UNION ALL
SELECT '', p.application_name, true, p.state IS NOT NULL AND p.replay_bytes IS NOT NULL,
       COALESCE(EXTRACT(epoch FROM p.replay_lag), 0)::float8, COALESCE(p.replay_bytes, 0), 0
FROM phys p
WHERE p.pid NOT IN (SELECT active_pid FROM pg_replication_slots WHERE active_pid IS NOT NULL)
ORDER BY 1, 2`

// Standbys reads the physical standbys and slots of the server, marking
// those named in ignore (a slot's name, or the application_name of a
// standby without a slot) as ignored.
func Standbys(ctx context.Context, q dbconn.Querier, ignore []string) ([]Standby, error) {
	rows, err := q.Query(ctx, standbysSQL)
	if err != nil {
		return nil, fmt.Errorf("read standbys: %w", err)
	}
	defer rows.Close()
	var out []Standby
	for rows.Next() {
		var s Standby
		var secs float64
		if err := rows.Scan(&s.Slot, &s.Name, &s.Connected, &s.Measured, &secs, &s.ReplayBytes, &s.Retained); err != nil {
			return nil, fmt.Errorf("read standbys: %w", err)
		}
		s.ReplayLag = time.Duration(secs * float64(time.Second))
		s.Ignored = slices.Contains(ignore, s.Label())
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read standbys: %w", err)
	}
	return out, nil
}

// StandbyBounds are the throttle's bounds on standbys; 0 is not checked.
type StandbyBounds struct {
	MaxLag      time.Duration // throttle.max_replica_lag
	MaxLagBytes int64         // throttle.max_replica_lag_bytes
}

// Lagging says why s holds the batches back, or returns ok false. A
// standby that cannot be measured (disconnected, or its positions hidden)
// is lagging: it is not a standby with no lag.
func (b StandbyBounds) Lagging(s Standby) (r Reason, ok bool) {
	if s.Ignored || b.MaxLag == 0 && b.MaxLagBytes == 0 {
		return Reason{}, false
	}
	const unblock = "; bring the standby back, drop the slot (SELECT pg_drop_replication_slot('%s')) if it is gone for good, or add it to throttle.ignore_slots"
	switch {
	case !s.Connected:
		return Reason{ReasonStandbyDisconnected, fmt.Sprintf("standby slot %q is not connected and holds %s of WAL"+unblock,
			s.Slot, SizeText(s.Retained), s.Slot)}, true
	case !s.Measured && s.Slot == "":
		// With a slot, what it retains still measures it (below).
		return Reason{ReasonReplicaLag, fmt.Sprintf("standby %q is connected but its replay position cannot be read "+
			"(grant pg_read_all_stats to the daemon's role, give the standby a slot, or add its application_name to throttle.ignore_slots)", s.Label())}, true
	case b.MaxLagBytes > 0 && s.ReplayBytes > b.MaxLagBytes:
		return Reason{ReasonReplicaBytes, fmt.Sprintf("standby %q replays %s behind > throttle.max_replica_lag_bytes %s",
			s.Label(), SizeText(s.ReplayBytes), SizeText(b.MaxLagBytes))}, true
	case b.MaxLagBytes > 0 && s.Retained > b.MaxLagBytes:
		return Reason{ReasonReplicaBytes, fmt.Sprintf("standby slot %q holds %s of WAL > throttle.max_replica_lag_bytes %s",
			s.Slot, SizeText(s.Retained), SizeText(b.MaxLagBytes))}, true
	case b.MaxLag > 0 && s.ReplayLag > b.MaxLag:
		return Reason{ReasonReplicaLag, fmt.Sprintf("standby %q replay lag %s > throttle.max_replica_lag %s",
			s.Label(), s.ReplayLag.Round(time.Millisecond), b.MaxLag)}, true
	}
	return Reason{}, false
}

// SizeText writes n bytes as pg_size_pretty does: "512 bytes", "412 MB".
func SizeText(n int64) string {
	units := []string{"bytes", "kB", "MB", "GB", "TB", "PB"}
	i := 0
	for ; i < len(units)-1 && (n >= 10*1024 || n <= -10*1024); i++ {
		n = (n + 512) / 1024 // pg_size_pretty rounds half up
	}
	return fmt.Sprintf("%d %s", n, units[i])
}
