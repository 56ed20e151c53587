package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

// designYAML is the config of DESIGN.md, section Interface.
const designYAML = `
name: split_full_name            # [a-z0-9_]{1,40}; names slot, publication, state row
database:
  dsn: postgres://app@localhost:5432/app
table: public.users
expand:
  - ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text
columns:                         # new column -> SQL expression over the same row
  first_name: split_part(full_name, ' ', 1)
  last_name: split_part(full_name, ' ', 2)
contract:
  - ALTER TABLE users DROP COLUMN full_name
rollback:
  - ALTER TABLE users DROP COLUMN first_name, DROP COLUMN last_name
backfill:
  batch_size: 5000               # first batch; then sized to target_batch_time
  target_batch_time: 200ms       # 0 keeps batch_size fixed
  sleep: 10ms                    # pause between batches
  max_rows_per_second: 0         # 0 = no cap
  workers: 1                     # key ranges done in parallel
throttle:
  max_replica_lag: 10s           # physical standbys, pg_stat_replication.replay_lag
  max_slot_lag: 1GB              # WAL the daemon's own slot holds back
sync:
  flush_interval: 50ms
  max_batch_keys: 5000
dual_write:
  detect: manual                 # manual: wait for ` + "`approve`" + `; auto: no corrections for quiet_period
  quiet_period: 2m
contract_policy:
  mode: manual                   # manual | auto | never
  hold: 10m
ddl:
  lock_timeout: 2s
  max_retries: 30
http:
  listen: 127.0.0.1:9187         # /metrics /healthz /readyz /status
log:
  level: info
  format: text                   # text | json
`

const minimalYAML = `
name: m1
database:
  dsn: postgres://app@localhost:5432/app
table: users
columns:
  b_col: upper(a)
  a_col: lower(a)
`

func TestMain(m *testing.M) {
	// Tests set the CDCBACKFILL_ variables they need; none may leak in.
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, EnvPrefix) {
			os.Unsetenv(kv[:strings.IndexByte(kv, '=')])
		}
	}
	os.Exit(m.Run())
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "migration.yaml")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func mustLoad(t *testing.T, path string, fs *pflag.FlagSet) *Config {
	t.Helper()
	c, err := Load(path, fs)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return c
}

func defaultsWant() Config {
	return Config{
		Backfill:       Backfill{BatchSize: 5000, TargetBatchTime: 200 * time.Millisecond, Sleep: 10 * time.Millisecond, MaxRowsPerSecond: 0, Workers: 1},
		Throttle:       Throttle{MaxReplicaLag: 10 * time.Second, MaxReplicaLagBytes: 1 << 30, MaxSlotLag: 1 << 30},
		Sync:           Sync{FlushInterval: 50 * time.Millisecond, MaxBatchKeys: 5000, OriginFilter: "auto", Correction: "continuous", DeferFor: 30 * time.Second, MaxDeferredKeys: 100000},
		Verify:         Verify{Workers: 2},
		DualWrite:      DualWrite{Detect: "manual", QuietPeriod: 2 * time.Minute, MinEvidence: 1000},
		ContractPolicy: ContractPolicy{Mode: "manual", Hold: 10 * time.Minute, LockTimeout: 500 * time.Millisecond, CatchupTimeout: time.Second, MaxHold: 2 * time.Second},
		DDL:            DDL{LockTimeout: 2 * time.Second, MaxRetries: 30, ConcurrentTimeout: 10 * time.Minute},
		HTTP:           HTTP{Listen: "127.0.0.1:9187"},
		Log:            Log{Level: "info", Format: "text"},
	}
}

func TestLoadDesignConfig(t *testing.T) {
	c := mustLoad(t, writeFile(t, designYAML), nil)
	want := defaultsWant()
	want.Name = "split_full_name"
	want.Database.DSN = "postgres://app@localhost:5432/app"
	want.Table = "public.users"
	want.Expand = []string{"ALTER TABLE users ADD COLUMN first_name text, ADD COLUMN last_name text"}
	want.Columns = []Column{
		{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"},
		{Name: "last_name", Expr: "split_part(full_name, ' ', 2)"},
	}
	want.Contract = []string{"ALTER TABLE users DROP COLUMN full_name"}
	want.Rollback = []string{"ALTER TABLE users DROP COLUMN first_name, DROP COLUMN last_name"}
	if !reflect.DeepEqual(*c, want) {
		t.Errorf("got  %+v\nwant %+v", *c, want)
	}
	if s, tb := c.TableIdent(); s != "public" || tb != "users" {
		t.Errorf("TableIdent = %q, %q", s, tb)
	}
	if got := c.QuotedTable(); got != `"public"."users"` {
		t.Errorf("QuotedTable = %s", got)
	}
	if c.SlotName() != "cdcbackfill_split_full_name" {
		t.Errorf("SlotName = %s", c.SlotName())
	}
}

func TestLoadMinimalFillsDefaults(t *testing.T) {
	c := mustLoad(t, writeFile(t, minimalYAML), nil)
	want := defaultsWant()
	want.Name = "m1"
	want.Database.DSN = "postgres://app@localhost:5432/app"
	want.Table = "users"
	want.Columns = []Column{{Name: "a_col", Expr: "lower(a)"}, {Name: "b_col", Expr: "upper(a)"}} // sorted
	if !reflect.DeepEqual(*c, want) {
		t.Errorf("got  %+v\nwant %+v", *c, want)
	}
	if d := *Default(); !reflect.DeepEqual(d, defaultsWant()) {
		t.Errorf("Default() = %+v", d)
	}
	for _, k := range Keys() {
		if _, ok := findKey(k); !ok {
			t.Errorf("Keys() has unknown %q", k)
		}
	}
	if len(Keys()) != 38 {
		t.Errorf("Keys() has %d keys", len(Keys()))
	}
}

func TestEnvOverridesFile(t *testing.T) {
	path := writeFile(t, minimalYAML+"backfill:\n  batch_size: 100\n")
	t.Setenv("CDCBACKFILL_DATABASE_DSN", "postgres://other@db.example:6543/x")
	t.Setenv("CDCBACKFILL_BACKFILL_BATCH_SIZE", "777")
	t.Setenv("CDCBACKFILL_HTTP_LISTEN", "") // empty disables
	t.Setenv("CDCBACKFILL_LOG_LEVEL", "DEBUG")
	t.Setenv("CDCBACKFILL_CONTRACT", `["ALTER TABLE users DROP COLUMN a", "SELECT 1"]`)
	t.Setenv("CDCBACKFILL_ROLLBACK", "ALTER TABLE users DROP COLUMN a_col, DROP COLUMN b_col")
	t.Setenv("CDCBACKFILL_UNKNOWN_THING", "ignored")
	c := mustLoad(t, path, nil)
	if c.Database.DSN != "postgres://other@db.example:6543/x" {
		t.Errorf("DSN = %q", c.Database.DSN)
	}
	if c.Backfill.BatchSize != 777 {
		t.Errorf("BatchSize = %d", c.Backfill.BatchSize)
	}
	if c.HTTP.Listen != "" {
		t.Errorf("Listen = %q", c.HTTP.Listen)
	}
	if c.Log.Level != "debug" {
		t.Errorf("Level = %q", c.Log.Level)
	}
	if !reflect.DeepEqual(c.Contract, []string{"ALTER TABLE users DROP COLUMN a", "SELECT 1"}) {
		t.Errorf("Contract = %q", c.Contract)
	}
	if !reflect.DeepEqual(c.Rollback, []string{"ALTER TABLE users DROP COLUMN a_col, DROP COLUMN b_col"}) {
		t.Errorf("Rollback = %q", c.Rollback)
	}
}

func TestEnvOnlyNoFile(t *testing.T) {
	t.Setenv("CDCBACKFILL_NAME", "envonly")
	t.Setenv("CDCBACKFILL_DATABASE_DSN", "host=localhost user=app dbname=app")
	t.Setenv("CDCBACKFILL_TABLE", `app."Users"`)
	t.Setenv("CDCBACKFILL_COLUMNS", `{"full": "a || ' ' || b"}`)
	t.Setenv("CDCBACKFILL_THROTTLE_MAX_SLOT_LAG", "512MiB")
	c := mustLoad(t, "", nil)
	if c.Name != "envonly" || len(c.Columns) != 1 || c.Columns[0] != (Column{"full", "a || ' ' || b"}) {
		t.Errorf("got %+v", c)
	}
	if s, tb := c.TableIdent(); s != "app" || tb != "Users" {
		t.Errorf("TableIdent = %q, %q", s, tb)
	}
	if c.Throttle.MaxSlotLag != 512<<20 {
		t.Errorf("MaxSlotLag = %d", c.Throttle.MaxSlotLag)
	}
}

// throttle.ignore_slots reads as a YAML list in the file, and as a YAML
// list or one name in the environment.
func TestIgnoreSlots(t *testing.T) {
	c := mustLoad(t, writeFile(t, minimalYAML+"throttle:\n  ignore_slots: [replica1, old_standby]\n  max_replica_lag_bytes: 256MB\n"), nil)
	if !reflect.DeepEqual(c.Throttle.IgnoreSlots, SlotNames{"replica1", "old_standby"}) || c.Throttle.MaxReplicaLagBytes != 256<<20 {
		t.Errorf("throttle %+v", c.Throttle)
	}
	t.Setenv("CDCBACKFILL_THROTTLE_IGNORE_SLOTS", "replica9")
	c = mustLoad(t, writeFile(t, minimalYAML), nil)
	if !reflect.DeepEqual(c.Throttle.IgnoreSlots, SlotNames{"replica9"}) {
		t.Errorf("IgnoreSlots = %q", c.Throttle.IgnoreSlots)
	}
}

func TestFlagOverridesEnv(t *testing.T) {
	path := writeFile(t, minimalYAML)
	t.Setenv("CDCBACKFILL_BACKFILL_BATCH_SIZE", "777")
	t.Setenv("CDCBACKFILL_BACKFILL_WORKERS", "3")
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	fs.Int("backfill.batch_size", 0, "")
	fs.Int("backfill.workers", 0, "")                 // not set: env wins
	fs.Duration("backfill.sleep", time.Second, "")    // set below
	fs.StringArray("expand", nil, "")                 // one statement per item
	fs.StringArray("columns", nil, "")                // NAME=EXPR per item
	fs.String("config", "", "")                       // not a key: ignored
	fs.String("log.level", "warn", "")                // not set: default stays
	fs.Float64("backfill.max_rows_per_second", 0, "") // set below
	fs.String("throttle.max_slot_lag", "", "")        // set below
	err := fs.Parse([]string{
		"--backfill.batch_size=42",
		"--backfill.sleep=0s",
		"--expand=ALTER TABLE users ADD COLUMN a_col text, ADD COLUMN c_col text",
		"--expand=SELECT 1",
		"--columns=c_col=coalesce(a, 'x=y')",
		"--config=whatever.yaml",
		"--backfill.max_rows_per_second=1500.5",
		"--throttle.max_slot_lag=0",
	})
	if err != nil {
		t.Fatal(err)
	}
	c := mustLoad(t, path, fs)
	if c.Backfill.BatchSize != 42 || c.Backfill.Workers != 3 || c.Backfill.Sleep != 0 || c.Log.Level != "info" {
		t.Errorf("backfill %+v log %+v", c.Backfill, c.Log)
	}
	if c.Backfill.MaxRowsPerSecond != 1500.5 || c.Throttle.MaxSlotLag != 0 {
		t.Errorf("backfill %+v throttle %+v", c.Backfill, c.Throttle)
	}
	if len(c.Expand) != 2 || c.Expand[1] != "SELECT 1" {
		t.Errorf("Expand = %q", c.Expand)
	}
	if !reflect.DeepEqual(c.Columns, []Column{{"c_col", "coalesce(a, 'x=y')"}}) {
		t.Errorf("Columns = %+v", c.Columns)
	}
}

func TestLoadErrors(t *testing.T) {
	// base is minimalYAML without the keys a case wants to replace.
	base := func(drop ...string) string {
		lines := map[string]string{
			"name":    "name: m1\n",
			"dsn":     "database:\n  dsn: postgres://app@localhost:5432/app\n",
			"table":   "table: users\n",
			"columns": "columns:\n  a_col: lower(a)\n",
		}
		var b strings.Builder
		for _, k := range []string{"name", "dsn", "table", "columns"} {
			if !slices.Contains(drop, k) {
				b.WriteString(lines[k])
			}
		}
		return b.String()
	}
	cases := []struct {
		name    string
		yaml    string
		want    []string // all must be in the error
		notWant []string // none may be
	}{
		{"malformed yaml", "name: m1\nbackfill:\n  batch_size: [1,\n", []string{"migration.yaml", "not valid YAML", "line"}, nil},
		{"malformed yaml tabs", "name: m1\n\tdatabase: x\n", []string{"migration.yaml", "not valid YAML", "line 2"}, nil},
		{"unknown top-level key", base() + "backfil:\n  batch_size: 10\n", []string{`unknown key "backfil"`, `did you mean "backfill"`, "migration.yaml:7"}, nil},
		{"unknown nested key", base() + "backfill:\n  batchsize: 10\n", []string{`config: unknown key "backfill.batchsize"`, `"backfill.batch_size"`}, nil},
		{"unknown key no suggestion", base() + "zzzzzzzz: 1\n", []string{`unknown key "zzzzzzzz"`, "known keys at the top level: name, database"}, nil},
		{"section not a mapping", base() + "backfill: 10\n", []string{"config: backfill: must be a mapping with the keys batch_size"}, nil},
		{"duplicate key", base() + "name: m2\n", []string{"config: name: is set twice (first at line 1)"}, nil},
		{"bad name", base("name") + "name: Split-Name\n", []string{"config: name: must match", `got "Split-Name"`}, nil},
		{"long name", base("name") + "name: " + strings.Repeat("a", 41) + "\n", []string{"config: name: must match"}, nil},
		{"missing name", base("name"), []string{"config: name: is required"}, nil},
		{"missing dsn", base("dsn"), []string{"config: database.dsn: is required"}, nil},
		{"bad dsn", base("dsn") + "database:\n  dsn: postgres://u:s3cret@host:notaport/db\n",
			[]string{"config: database.dsn: is not a valid PostgreSQL connection string", "invalid port", "postgres://u:xxxxx@host:notaport/db"},
			[]string{"s3cret"}},
		{"bad dsn kv", base("dsn") + "database:\n  dsn: \"host=h password=s3cret port=nope\"\n",
			[]string{"config: database.dsn: is not a valid PostgreSQL connection string", "password=xxxxx"},
			[]string{"s3cret"}},
		{"missing table", base("table"), []string{"config: table: is required"}, nil},
		{"bad table", base("table") + "table: a.b.c\n", []string{"config: table: must be", `got "a.b.c"`}, nil},
		{"missing columns", base("columns"), []string{"config: columns: is required"}, nil},
		{"columns not a map", base("columns") + "columns: [a, b]\n", []string{"config: columns: must be a mapping of new column name to SQL expression, got a list"}, nil},
		{"empty expression", base("columns") + "columns:\n  a_col: \"\"\n  b_col:\n", []string{
			"config: columns.a_col: must be a non-empty SQL expression",
			"config: columns.b_col: must be a non-empty SQL expression",
		}, nil},
		{"expression not a string", base("columns") + "columns:\n  a_col: [x]\n", []string{"config: columns.a_col: must be a SQL expression (a string), got a list"}, nil},
		{"bad column name", base("columns") + "columns:\n  First-Name: x\n", []string{"config: columns.First-Name: is not a valid column name", "migration.yaml:6"}, nil},
		{"contract without columns", base("columns") + "contract:\n  - ALTER TABLE users DROP COLUMN a\n", []string{"config: contract: needs columns to be set", "config: columns: is required"}, nil},
		{"list as string", base() + "expand: ALTER TABLE users ADD COLUMN a_col text\n", []string{`config: expand: must be a list of SQL statements`, "got the string"}, nil},
		{"empty statement", base() + "rollback:\n  - SELECT 1\n  - \"  \"\n", []string{"config: rollback[1]: must be a non-empty SQL statement", "migration.yaml:9"}, nil},
		{"statement is a mapping", base() + "expand:\n  - ALTER TABLE t ADD COLUMN x: text\n", []string{"config: expand[0]: must be a SQL statement (a string), got a mapping"}, nil},
		{"bad duration", base() + "backfill:\n  target_batch_time: 10\n", []string{`config: backfill.target_batch_time: must be a duration such as 200ms or 2m, got "10"`}, nil},
		{"bad duration word", base() + "dual_write:\n  quiet_period: soon\n", []string{`config: dual_write.quiet_period: must be a duration such as 200ms or 2m, got "soon"`}, nil},
		{"negative duration", base() + "backfill:\n  sleep: -1s\n", []string{"config: backfill.sleep: must not be negative, got -1s"}, nil},
		{"zero flush interval", base() + "sync:\n  flush_interval: 0s\n", []string{"config: sync.flush_interval: must be greater than 0"}, nil},
		{"zero lock timeout", base() + "ddl:\n  lock_timeout: 0\n", []string{"config: ddl.lock_timeout: must be greater than 0"}, nil},
		{"bad size", base() + "throttle:\n  max_slot_lag: lots\n", []string{`config: throttle.max_slot_lag: must be a size such as 1GB or 512MB, got "lots"`}, nil},
		{"bad size unit", base() + "throttle:\n  max_slot_lag: 5PB\n", []string{`config: throttle.max_slot_lag: must be a size such as 1GB or 512MB`, `got "5PB"`}, nil},
		{"ignore_slots not a list", base() + "throttle:\n  ignore_slots: {a: b}\n", []string{"config: throttle.ignore_slots: must be a list of slot names"}, nil},
		{"bad slot name", base() + "throttle:\n  ignore_slots: [replica1, Replica-2]\n", []string{`config: throttle.ignore_slots[1]: must be a replication slot name`, `got "Replica-2"`}, nil},
		{"negative replica bytes", base() + "throttle:\n  max_replica_lag_bytes: -1\n", []string{"config: throttle.max_replica_lag_bytes: must not be negative"}, nil},
		{"bad enum", base() + "contract_policy:\n  mode: sometimes\n", []string{`config: contract_policy.mode: must be one of manual, auto, never, got "sometimes"`}, nil},
		{"bad log level", base() + "log:\n  level: loud\n  format: xml\n", []string{`config: log.level: must be one of debug, info, warn, error, got "loud"`, `config: log.format: must be one of text, json, got "xml"`}, nil},
		{"bad detect", base() + "dual_write:\n  detect: maybe\n", []string{`config: dual_write.detect: must be one of manual, auto, got "maybe"`}, nil},
		{"bad int", base() + "backfill:\n  batch_size: abc\n", []string{`config: backfill.batch_size: must be a positive integer, got "abc"`, "migration.yaml:8"}, nil},
		{"zero int", base() + "sync:\n  max_batch_keys: 0\n", []string{`config: sync.max_batch_keys: must be a positive integer, got 0`}, nil},
		{"negative retries", base() + "ddl:\n  max_retries: -1\n", []string{`config: ddl.max_retries: must be an integer >= 0, got -1`}, nil},
		{"bad float", base() + "backfill:\n  max_rows_per_second: -5\n", []string{`config: backfill.max_rows_per_second: must be a number >= 0`}, nil},
		{"bad workers", base() + "backfill:\n  workers: 65\n", []string{`config: backfill.workers: must be an integer from 1 to 64, got 65`}, nil},
		{"int is a list", base() + "backfill:\n  workers: [1]\n", []string{`config: backfill.workers: must be an integer from 1 to 64, got a list`}, nil},
		{"zero min evidence", base() + "dual_write:\n  min_evidence: 0\n", []string{`config: dual_write.min_evidence: must be a positive integer, got 0`}, nil},
		{"bad min evidence", base() + "dual_write:\n  min_evidence: lots\n", []string{`config: dual_write.min_evidence: must be a positive integer, got "lots"`, "migration.yaml:8"}, nil},
		{"zero cut-over lock timeout", base() + "contract_policy:\n  lock_timeout: 0s\n", []string{"config: contract_policy.lock_timeout: must be greater than 0, got 0s"}, nil},
		{"negative catch-up timeout", base() + "contract_policy:\n  catchup_timeout: -1s\n", []string{"config: contract_policy.catchup_timeout: must be greater than 0, got -1s"}, nil},
		{"bad listen", base() + "http:\n  listen: localhost\n", []string{`config: http.listen: must be host:port`, `got "localhost"`}, nil},
		{"top level not a mapping", "- a\n- b\n", []string{"the top level must be a mapping"}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(writeFile(t, tc.yaml), nil)
			if err == nil {
				t.Fatal("Load succeeded, want an error")
			}
			msg := err.Error()
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error does not contain %q:\n%s", w, msg)
				}
			}
			for _, nw := range tc.notWant {
				if strings.Contains(msg, nw) {
					t.Errorf("error contains %q:\n%s", nw, msg)
				}
			}
		})
	}
}

func TestAllProblemsTogether(t *testing.T) {
	_, err := Load(writeFile(t, "name: BAD\nbackfill:\n  batch_size: abc\n  workers: 0\nbogus: 1\n"), nil)
	var ce *Error
	if !errors.As(err, &ce) {
		t.Fatalf("want *Error, got %T %v", err, err)
	}
	got := strings.Split(err.Error(), "\n")
	want := []string{
		`config: unknown key "bogus"`,
		"config: name: must match",
		"config: database.dsn: is required",
		"config: table: is required",
		"config: columns: is required",
		`config: backfill.batch_size: must be a positive integer, got "abc"`,
		"config: backfill.workers: must be an integer from 1 to 64, got 0",
	}
	if len(got) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(got), len(want), err)
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("line %d = %q, want prefix %q", i, got[i], want[i])
		}
	}
}

func TestEnvAndFlagErrors(t *testing.T) {
	t.Setenv("CDCBACKFILL_BACKFILL_BATCH_SIZE", "lots")
	t.Setenv("CDCBACKFILL_COLUMNS", "not a map")
	_, err := Load(writeFile(t, minimalYAML), nil)
	if err == nil {
		t.Fatal("want error")
	}
	for _, w := range []string{
		`config: backfill.batch_size: must be a positive integer, got "lots" (env CDCBACKFILL_BACKFILL_BATCH_SIZE)`,
		`config: columns: must be a mapping of new column name to SQL expression`,
	} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error does not contain %q:\n%s", w, err)
		}
	}
	if strings.Contains(err.Error(), "columns: is required") {
		t.Errorf("columns reported twice:\n%s", err)
	}

	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	fs.String("sync.flush_interval", "", "")
	if err := fs.Parse([]string{"--sync.flush_interval=fast"}); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CDCBACKFILL_BACKFILL_BATCH_SIZE", "10")
	t.Setenv("CDCBACKFILL_COLUMNS", "")
	_, err = Load(writeFile(t, minimalYAML), fs)
	if err == nil || !strings.Contains(err.Error(), `config: sync.flush_interval: must be a duration such as 200ms or 2m, got "fast" (flag --sync.flush_interval)`) {
		t.Errorf("err = %v", err)
	}
}

func TestFileErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := Load(missing, nil)
	if err == nil || !strings.Contains(err.Error(), missing) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	_, err = Load(t.TempDir(), nil)
	if err == nil || !strings.Contains(err.Error(), "cannot read config file") {
		t.Errorf("directory: %v", err)
	}
	_, err = Load(writeFile(t, "name: a\n---\nname: b\n"), nil)
	if err == nil || !strings.Contains(err.Error(), "more than one YAML document") {
		t.Errorf("two documents: %v", err)
	}
	// An empty file is fine if env supplies the rest.
	t.Setenv("CDCBACKFILL_NAME", "x")
	t.Setenv("CDCBACKFILL_DATABASE_DSN", "postgres://localhost/x")
	t.Setenv("CDCBACKFILL_TABLE", "t")
	t.Setenv("CDCBACKFILL_COLUMNS", "a: b")
	if _, err := Load(writeFile(t, "# nothing\n"), nil); err != nil {
		t.Errorf("empty file: %v", err)
	}
}

func TestLoadDetails(t *testing.T) {
	// Keys match case-insensitively; anchors work; null keeps the default;
	// quoted table names keep their case; an explicit "" listen disables.
	y := `
Name: m1
database: {dsn: "postgres://app@localhost:5432/app"}
table: '"Sales"."Orders"'
columns:
  total: &e price * qty
  total2: *e
backfill:
  batch_size:
  workers: 4
http:
  listen: ""
`
	c := mustLoad(t, writeFile(t, y), nil)
	if c.Name != "m1" || c.Backfill.BatchSize != 5000 || c.Backfill.Workers != 4 || c.HTTP.Listen != "" {
		t.Errorf("got %+v", c)
	}
	if len(c.Columns) != 2 || c.Columns[1].Expr != "price * qty" {
		t.Errorf("Columns = %+v", c.Columns)
	}
	if s, tb := c.TableIdent(); s != "Sales" || tb != "Orders" {
		t.Errorf("TableIdent = %q %q", s, tb)
	}
}

func TestParseTable(t *testing.T) {
	for _, tc := range []struct{ in, schema, table string }{
		{"users", "public", "users"},
		{"Users", "public", "users"},
		{"app.users", "app", "users"},
		{`"My Table"`, "public", "My Table"},
		{`"a""b".c`, `a"b`, "c"},
		{"t$1", "public", "t$1"},
	} {
		s, tb, err := parseTable(tc.in)
		if err != nil || s != tc.schema || tb != tc.table {
			t.Errorf("parseTable(%q) = %q, %q, %v", tc.in, s, tb, err)
		}
	}
	for _, in := range []string{"", ".", "a.", ".a", "a.b.c", "1abc", `"unclosed`, `""`, "a b", "a-b", strings.Repeat("x", 64)} {
		if _, _, err := parseTable(in); err == nil {
			t.Errorf("parseTable(%q) succeeded", in)
		}
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"0", 0}, {"1234", 1234}, {"10B", 10}, {"10kB", 10 << 10}, {"10KB", 10 << 10}, {"1KiB", 1 << 10},
		{"512MB", 512 << 20}, {"512mb", 512 << 20}, {"1GB", 1 << 30}, {"1GiB", 1 << 30}, {"2TB", 2 << 40},
		{"1TiB", 1 << 40}, {"1.5GB", 3 << 29}, {" 1 GB ", 1 << 30},
	} {
		got, err := ParseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"", "lots", "-1GB", "1.5", "1XB", "GB", "9999999999999TB", "1e9"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) succeeded", in)
		}
	}
}

func TestDSNErrorsNeverShowPassword(t *testing.T) {
	for _, dsn := range []string{
		"postgres://u:s3cret@host:notaport/db",
		"postgres://u:s3cret@host/db?sslmode=bogus",
		"postgres://u:s3cret@host/db?connect_timeout=x",
		"postgres://u:s3cret@[::1/db",
		"postgres://u:s3%2Fcret@host:99999999/db",
		"postgres://user:s3cret/word@host/db",
		"host=h password=s3cret port=abc",
		"host=h password='s3cret' sslmode=bogus",
		"host=h password=s3cret bogus",
	} {
		c := Default()
		c.Name, c.Table, c.Columns = "x", "t", []Column{{"a", "b"}}
		c.Database.DSN = dsn
		err := c.Validate()
		if err == nil {
			t.Errorf("%s: no error", dsn)
			continue
		}
		if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "s3/cret") || strings.Contains(err.Error(), "s3%2Fcret") {
			t.Errorf("password leaked: %v", err)
		}
		if !strings.Contains(err.Error(), "database.dsn") {
			t.Errorf("key not named: %v", err)
		}
	}
}

func TestValidateDefault(t *testing.T) {
	c := Default()
	c.Name, c.Table, c.Columns = "x", "t", []Column{{"a", "b"}}
	c.Database.DSN = "postgres://localhost/x"
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	if DefaultValue("backfill.batch_size") != "5000" || EnvVar("dual_write.quiet_period") != "CDCBACKFILL_DUAL_WRITE_QUIET_PERIOD" {
		t.Error("DefaultValue/EnvVar")
	}
	for _, k := range Keys() {
		if want := k == "expand" || k == "columns" || k == "contract" || k == "rollback" || k == "throttle.ignore_slots" || k == "ddl.allow"; ListKey(k) != want {
			t.Errorf("ListKey(%q) = %v", k, !want)
		}
	}
}
