// Package config loads a migration's configuration from YAML, the
// environment (CDCBACKFILL_*) and flags, fills in the defaults of DESIGN.md
// and validates it with errors that name the key at fault.
package config

import "time"

// Config is one migration, as the user wrote it, defaults filled in.
type Config struct {
	Name           string         `mapstructure:"name"`
	Database       Database       `mapstructure:"database"`
	Table          string         `mapstructure:"table"`
	Expand         []string       `mapstructure:"expand"`
	Columns        []Column       `mapstructure:"-"` // from the `columns` map, sorted by name
	Contract       []string       `mapstructure:"contract"`
	Rollback       []string       `mapstructure:"rollback"`
	Backfill       Backfill       `mapstructure:"backfill"`
	Throttle       Throttle       `mapstructure:"throttle"`
	Sync           Sync           `mapstructure:"sync"`
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
	BatchSize        int           `mapstructure:"batch_size"`
	TargetBatchTime  time.Duration `mapstructure:"target_batch_time"`
	Sleep            time.Duration `mapstructure:"sleep"`
	MaxRowsPerSecond float64       `mapstructure:"max_rows_per_second"`
	Workers          int           `mapstructure:"workers"`
}

type Throttle struct {
	MaxReplicaLag time.Duration `mapstructure:"max_replica_lag"`
	MaxSlotLag    int64         `mapstructure:"-"` // bytes, from a size such as "1GB"
}

type Sync struct {
	FlushInterval time.Duration `mapstructure:"flush_interval"`
	MaxBatchKeys  int           `mapstructure:"max_batch_keys"`
}

type DualWrite struct {
	Detect      string        `mapstructure:"detect"` // manual | auto
	QuietPeriod time.Duration `mapstructure:"quiet_period"`
	// MinEvidence is how many application writes of the new columns that
	// needed no correction auto detection requires.
	MinEvidence int `mapstructure:"min_evidence"`
}

type ContractPolicy struct {
	Mode string        `mapstructure:"mode"` // manual | auto | never
	Hold time.Duration `mapstructure:"hold"`
	// LockTimeout is the cut-over's lock_timeout (kept below the server's
	// deadlock_timeout); CatchupTimeout how long it waits, holding the
	// lock, for the stream to receive everything up to it.
	LockTimeout    time.Duration `mapstructure:"lock_timeout"`
	CatchupTimeout time.Duration `mapstructure:"catchup_timeout"`
}

type DDL struct {
	LockTimeout time.Duration `mapstructure:"lock_timeout"`
	MaxRetries  int           `mapstructure:"max_retries"`
}

type HTTP struct {
	Listen string `mapstructure:"listen"` // empty disables the HTTP server
}

type Log struct {
	Level  string `mapstructure:"level"`  // debug | info | warn | error
	Format string `mapstructure:"format"` // text | json
}

// SlotName is the logical replication slot this migration owns.
func (c *Config) SlotName() string { return "cdcbackfill_" + c.Name }

// PublicationName is the publication this migration owns.
func (c *Config) PublicationName() string { return "cdcbackfill_" + c.Name }

// OriginPrefix prefixes the replication origins of the daemon's writers, so
// the stream can tell the daemon's own transactions from the application's.
// The '.' cannot occur in a name, so no migration's prefix is another's.
func (c *Config) OriginPrefix() string { return "cdcbackfill_" + c.Name + "." }
