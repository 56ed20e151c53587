package snapshot

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/internal/sessions"
)

// Plan is what the backfill covers: keys up to Hi, about Estimate rows.
type Plan struct {
	Lo       recompute.Key `json:"lo"`
	Hi       recompute.Key `json:"hi"`
	Estimate int64         `json:"estimate"`
}

// Slot is a freshly created logical slot whose exported snapshot is still
// held by its replication connection.
type Slot struct {
	Name          string
	ConsistentLSN pglogrepl.LSN
	SnapshotName  string
	conn          *pgconn.PgConn
}

// Release closes the replication connection, which ends the exported
// snapshot; the slot stays.
func (s *Slot) Release() {
	if s.conn != nil {
		s.conn.Close(context.Background())
		s.conn = nil
	}
}

// EnsurePublication creates the publication for the table unless it exists;
// run runs the CREATE statement (under the caller's lock_timeout and
// retries).
func EnsurePublication(ctx context.Context, q dbconn.Querier, name string, t *recompute.Table, run func(stmt string) error) error {
	var exists bool
	if err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, name).Scan(&exists); err != nil {
		return fmt.Errorf("look up publication %q: %w", name, err)
	}
	if exists {
		return nil
	}
	// Whole rows are published although only the key is read: a column
	// list would have to cover the table's replica identity for as long as
	// the migration runs, and an ALTER TABLE ... REPLICA IDENTITY FULL by
	// anyone meanwhile would make PostgreSQL refuse the application's
	// UPDATEs and DELETEs. It saved the daemon a little CPU, not the
	// walsender, whose cost is per change, not per column.
	target := t.Ident()
	// publish_via_partition_root: a partitioned table's changes then name
	// the table itself, not its partitions, so none is passed over.
	if err := run("CREATE PUBLICATION " + pgx.Identifier{name}.Sanitize() + " FOR TABLE " + target + " WITH (publish_via_partition_root = true)"); err != nil {
		return fmt.Errorf("create publication %q for %s: %w", name, t.Ident(), err)
	}
	return nil
}

// SlotInfo is what pg_replication_slots says of a slot.
type SlotInfo struct {
	Exists       bool
	Active       bool
	Database     string
	Plugin       string
	ConfirmedLSN pglogrepl.LSN
	WALStatus    string // reserved | extended | unreserved | lost
	LagBytes     int64  // WAL the slot holds back
	// Invalidated is why the server invalidated the slot (PostgreSQL 17+:
	// wal_removed, idle_timeout, ...), "" when it did not.
	Invalidated string
	Failover    bool // PostgreSQL 17+: a standby that synchronizes slots keeps it
}

// Lost is true when the slot can no longer stream: its WAL is gone or the
// server invalidated it.
func (s SlotInfo) Lost() bool { return s.WALStatus == "lost" || s.Invalidated != "" }

// LookupSlot reads a slot's row; Exists is false when there is none.
func LookupSlot(ctx context.Context, q dbconn.Querier, name string) (SlotInfo, error) {
	var s SlotInfo
	var confirmed *string
	var db, plugin, wal *string
	var lag *int64
	var invalidated *string
	var failover *bool
	// to_jsonb reads the columns newer servers have without naming them.
	err := q.QueryRow(ctx, `SELECT active, database, plugin, confirmed_flush_lsn::text, wal_status,
		pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
		to_jsonb(s) ->> 'invalidation_reason', (to_jsonb(s) ->> 'failover')::boolean
		FROM pg_replication_slots s WHERE slot_name = $1`, name).Scan(&s.Active, &db, &plugin, &confirmed, &wal, &lag, &invalidated, &failover)
	if errors.Is(err, pgx.ErrNoRows) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("look up slot %q: %w", name, err)
	}
	s.Exists = true
	if db != nil {
		s.Database = *db
	}
	if plugin != nil {
		s.Plugin = *plugin
	}
	if wal != nil {
		s.WALStatus = *wal
	}
	if lag != nil {
		s.LagBytes = *lag
	}
	if invalidated != nil {
		s.Invalidated = *invalidated
	}
	s.Failover = failover != nil && *failover
	if confirmed != nil {
		if s.ConfirmedLSN, err = pglogrepl.ParseLSN(*confirmed); err != nil {
			return s, err
		}
	}
	return s, nil
}

// CreateSlot creates the logical slot (pgoutput) with an exported snapshot
// on a replication connection that it keeps open: the snapshot lives as
// long as that connection stays idle. Slot creation waits for every open
// transaction that has written; after timeout it gives up and names them.
// With failover (PostgreSQL 17+) a standby that synchronizes slots keeps a
// copy of it.
func CreateSlot(ctx context.Context, dsn, name string, timeout time.Duration, failover bool) (*Slot, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse database.dsn: %w", err)
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["application_name"] = "cdcbackfill"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open replication connection: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	action := "EXPORT_SNAPSHOT"
	if failover {
		// The option list of PostgreSQL 15+; pglogrepl puts the action text
		// as it is after the plugin's name.
		action = "(SNAPSHOT 'export', FAILOVER true)"
	}
	res, err := pglogrepl.CreateReplicationSlot(cctx, conn, name, "pgoutput", pglogrepl.CreateReplicationSlotOptions{
		Mode:           pglogrepl.LogicalReplication,
		SnapshotAction: action,
	})
	if err != nil {
		conn.Close(context.Background())
		if cctx.Err() != nil && ctx.Err() == nil {
			return nil, fmt.Errorf("create replication slot %q: still waiting after %s for transactions that have written to finish%s; end them or retry",
				name, timeout, describeWriters(ctx, dsn))
		}
		return nil, fmt.Errorf("create replication slot %q: %w", name, err)
	}
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		conn.Close(context.Background())
		return nil, fmt.Errorf("slot %q consistent point %q: %w", name, res.ConsistentPoint, err)
	}
	return &Slot{Name: name, ConsistentLSN: lsn, SnapshotName: res.SnapshotName, conn: conn}, nil
}

// describeWriters lists the open transactions that hold an xid, which slot
// creation waits for.
func describeWriters(ctx context.Context, dsn string) string {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return ""
	}
	defer conn.Close(context.Background())
	writers, err := sessions.Describe(ctx, conn, 5, "a.backend_xid IS NOT NULL")
	if err != nil || writers == "" {
		return ""
	}
	return ": " + writers
}

// ReadPlan reads the plan inside the slot's exported snapshot, so the
// bounds are exactly those of the consistent point, then ends the
// transaction: no snapshot of the daemon outlives this call. The estimate
// is the planner's (0 for a table never analyzed: see CountRows).
func ReadPlan(ctx context.Context, conn *pgx.Conn, snapshotName string, t *recompute.Table) (Plan, error) {
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return Plan{}, fmt.Errorf("begin plan transaction: %w", err)
	}
	defer tx.Rollback(context.Background())
	// SET TRANSACTION SNAPSHOT takes a literal only; the name comes from
	// the server, quoted as a literal all the same.
	if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT "+dbconn.QuoteLiteral(snapshotName)); err != nil {
		return Plan{}, fmt.Errorf("import snapshot %q: %w", snapshotName, err)
	}
	lo, hi, n, err := t.Bounds(ctx, tx)
	if err != nil {
		return Plan{}, err
	}
	if err := tx.Commit(ctx); err != nil {
		return Plan{}, err
	}
	return Plan{Lo: lo, Hi: hi, Estimate: n}, nil
}

// ReadPlanNow reads the plan without the snapshot, for a slot that exists
// but whose plan was never saved (a crash between the two). Bounds read
// after the consistent point still cover every row that existed then and
// has not changed since: such a row still exists, with its key.
func ReadPlanNow(ctx context.Context, q dbconn.Querier, t *recompute.Table) (Plan, error) {
	lo, hi, n, err := t.Bounds(ctx, q)
	if err == nil && n == 0 && hi != nil {
		n, err = CountRows(ctx, q, t)
	}
	return Plan{Lo: lo, Hi: hi, Estimate: n}, err
}

// countChunk is the keys one counting statement covers.
const countChunk = 100000

// CountRows counts the table's rows in key-ordered chunks, an index-only
// walk of countChunk keys per statement, so no statement scans the whole
// table or runs long; for a table never analyzed, whose size the planner
// does not know.
func CountRows(ctx context.Context, q dbconn.Querier, t *recompute.Table) (int64, error) {
	var total int64
	var after recompute.Key
	for {
		n, last, err := t.CountAfter(ctx, q, after, countChunk)
		if err != nil {
			return 0, err
		}
		total += n
		if n < countChunk || last == nil {
			return total, nil
		}
		after = last
	}
}

// DropSlot drops the slot if it exists, ending a walsender still holding it.
func DropSlot(ctx context.Context, q dbconn.Querier, name string) error {
	_, err := q.Exec(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL`, name)
	if err != nil {
		return fmt.Errorf("end the reader of slot %q: %w", name, err)
	}
	for i := 0; ; i++ {
		_, err = q.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, name)
		// Still active for a moment after the terminate.
		if err == nil || dbconn.SQLState(err) != pgerrcode.ObjectInUse || i == 50 {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	if err != nil {
		return fmt.Errorf("drop slot %q: %w", name, err)
	}
	return nil
}

// DropPublication drops the publication if it exists.
func DropPublication(ctx context.Context, q dbconn.Querier, name string) error {
	if _, err := q.Exec(ctx, "DROP PUBLICATION IF EXISTS "+pgx.Identifier{name}.Sanitize()); err != nil {
		return fmt.Errorf("drop publication %q: %w", name, err)
	}
	return nil
}
