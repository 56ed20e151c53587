// Package config loads a migration's configuration from YAML, the
// environment (CDCBACKFILL_*) and flags, fills in the defaults of DESIGN.md
// and validates it with errors that name the key at fault.
//
// The Config struct is the one list of keys: each leaf field is a key, in
// the order of DESIGN.md. Its tags say all there is to say about it:
//
//	mapstructure:"batch_size"  the key's name, under its section's
//	default:"5000"             the default, written as a user would
//	check:">0"                 what Validate requires: >0, >=0, lo..hi, or
//	                           a|b|c (one of, lower-cased on load)
//	zero:"no cap"              what 0 means, said in errors
//
// The field's Go type says how the text of a value is read: string, int,
// float64, time.Duration ("200ms"), int64 (a byte size, "1GB"), []string
// (SQL statements), SlotNames (a list of slot names) or []Column (a map of
// column to expression).
package config

import "time"

// Config is one migration, as the user wrote it, defaults filled in.
type Config struct {
	Name           string         `mapstructure:"name"`
	Database       Database       `mapstructure:"database"`
	Table          string         `mapstructure:"table"`
	Expand         []string       `mapstructure:"expand"`
	Columns        []Column       `mapstructure:"columns"` // from the `columns` map, sorted by name
	Contract       []string       `mapstructure:"contract"`
	Rollback       []string       `mapstructure:"rollback"`
	Backfill       Backfill       `mapstructure:"backfill"`
	Throttle       Throttle       `mapstructure:"throttle"`
	Sync           Sync           `mapstructure:"sync"`
	Verify         Verify         `mapstructure:"verify"`
	DualWrite      DualWrite      `mapstructure:"dual_write"`
	ContractPolicy ContractPolicy `mapstructure:"contract_policy"`
	DDL            DDL            `mapstructure:"ddl"`
	HTTP           HTTP           `mapstructure:"http"`
	Log            Log            `mapstructure:"log"`
}

// Column is a new column and the SQL expression over the same row that
// defines its value.
type Column struct {
	Name string
	Expr string
}

type Database struct {
	DSN string `mapstructure:"dsn"`
}

type Backfill struct {
	BatchSize        int           `mapstructure:"batch_size" default:"5000" check:">0"`
	TargetBatchTime  time.Duration `mapstructure:"target_batch_time" default:"200ms" check:">=0"`
	Sleep            time.Duration `mapstructure:"sleep" default:"10ms" check:">=0"`
	MaxRowsPerSecond float64       `mapstructure:"max_rows_per_second" default:"0" check:">=0" zero:"no cap"`
	Workers          int           `mapstructure:"workers" default:"1" check:"1..64"`
}

// Throttle holds the batches back while a physical standby lags (in time
// or in bytes: replay_lag is only measured while replay moves, so it goes
// stale or NULL exactly when a standby is stuck), while a standby's slot
// has no standby connected, and while the daemon's own slot lags.
type Throttle struct {
	MaxReplicaLag      time.Duration `mapstructure:"max_replica_lag" default:"10s" check:">=0" zero:"not checked"`
	MaxReplicaLagBytes int64         `mapstructure:"max_replica_lag_bytes" default:"1GB" check:">=0" zero:"not checked"` // bytes
	// Physical slots (or application_name of standbys without one) the
	// throttle does not watch, e.g. a decommissioned standby's.
	IgnoreSlots SlotNames `mapstructure:"ignore_slots"`
	MaxSlotLag  int64     `mapstructure:"max_slot_lag" default:"1GB" check:">=0" zero:"no cap"` // bytes
}

// SlotNames is a list of replication slot names.
type SlotNames []string

type Sync struct {
	FlushInterval time.Duration `mapstructure:"flush_interval" default:"50ms" check:">0"`
	MaxBatchKeys  int           `mapstructure:"max_batch_keys" default:"5000" check:">0"`
	// Where the daemon's own writes are filtered out of the stream: auto
	// has the walsender drop them (PostgreSQL 16+, when nothing else
	// replicates into the table), client skips them in the daemon.
	OriginFilter OriginFilter `mapstructure:"origin_filter" default:"auto" check:"auto|client"`
	// continuous corrects each changed row within flush_interval; deferred
	// holds changed keys up to defer_for (at most max_deferred_keys of
	// them) and corrects them in key order, in bulk, paced as the backfill
	// is: for busy tables, until dual-write, when nobody reads the new
	// columns yet.
	Correction      Correction    `mapstructure:"correction" default:"continuous" check:"continuous|deferred"`
	DeferFor        time.Duration `mapstructure:"defer_for" default:"30s" check:">0"`
	MaxDeferredKeys int           `mapstructure:"max_deferred_keys" default:"100000" check:">0"`
}

type Verify struct {
	// Connections that check parts of one verify chunk at once (a single
	// integer key only): the pass only reads, so no row lock bounds it.
	Workers int `mapstructure:"workers" default:"2" check:"1..64"`
}

type DualWrite struct {
	Detect      Detect        `mapstructure:"detect" default:"manual" check:"manual|auto"`
	QuietPeriod time.Duration `mapstructure:"quiet_period" default:"2m" check:">=0"`
	// Application writes that needed no correction, required before auto
	// detection.
	MinEvidence int `mapstructure:"min_evidence" default:"1000" check:">0"`
}

type ContractPolicy struct {
	Mode ContractMode  `mapstructure:"mode" default:"manual" check:"manual|auto|never"`
	Hold time.Duration `mapstructure:"hold" default:"10m" check:">=0"`
	// The cut-over's lock_timeout, kept below the server's deadlock_timeout.
	LockTimeout time.Duration `mapstructure:"lock_timeout" default:"500ms" check:">0"`
	// How long the cut-over waits, holding the lock, for the stream to
	// receive everything up to the WAL position read under it.
	CatchupTimeout time.Duration `mapstructure:"catchup_timeout" default:"1s" check:">0"`
	// The longest the contract DDL may run while the cut-over holds the
	// table's lock (its statement_timeout): what runs longer rolls back and
	// releases the lock, and the migration waits for the operator.
	MaxHold time.Duration `mapstructure:"max_hold" default:"2s" check:">0"`
}

type DDL struct {
	LockTimeout time.Duration `mapstructure:"lock_timeout" default:"2s" check:">0"`
	MaxRetries  int           `mapstructure:"max_retries" default:"30" check:">=0"`
	// Allow lists the rules of internal/ddl allowed for every statement
	// (rewrite, scan, blocking_index, other_relation); plan checks them.
	Allow []string `mapstructure:"allow"`
	// ConcurrentTimeout bounds the waits of a CONCURRENTLY build and of a
	// VALIDATE: their locks queue no application statement, so they may
	// wait minutes for older snapshots, where lock_timeout is seconds.
	ConcurrentTimeout time.Duration `mapstructure:"concurrent_timeout" default:"10m" check:">0"`
}

type HTTP struct {
	Listen string `mapstructure:"listen" default:"127.0.0.1:9187"` // empty disables the HTTP server
}

type Log struct {
	Level  string `mapstructure:"level" default:"info" check:"debug|info|warn|error"`
	Format string `mapstructure:"format" default:"text" check:"text|json"`
}

// SlotName is the logical replication slot this migration owns.
func (c *Config) SlotName() string { return "cdcbackfill_" + c.Name }

// PublicationName is the publication this migration owns.
func (c *Config) PublicationName() string { return "cdcbackfill_" + c.Name }

// OriginPrefix prefixes the replication origins of the daemon's writers, so
// the stream can tell the daemon's own transactions from the application's.
// The '.' cannot occur in a name, so no migration's prefix is another's.
func (c *Config) OriginPrefix() string { return "cdcbackfill_" + c.Name + "." }

// ColumnNames are the new columns' names, in the order of columns.
func (c *Config) ColumnNames() []string {
	names := make([]string, len(c.Columns))
	for i, col := range c.Columns {
		names[i] = col.Name
	}
	return names
}
