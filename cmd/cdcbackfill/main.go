// Command cdcbackfill carries a PostgreSQL table through an expand/contract
// schema change with zero downtime. This file holds flags, wiring and
// signals; the work is in the packages it calls.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/cdcbackfill/cdcbackfill/config"
)

// exitError carries an exit code through cobra without printing twice.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := newRoot().ExecuteContext(ctx)
	stop()
	var ee exitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		os.Exit(ee.code)
	default:
		fmt.Fprintln(os.Stderr, "cdcbackfill:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "cdcbackfill",
		Short: "Zero-downtime column changes on PostgreSQL, kept in sync from a logical replication slot instead of triggers",
		Long: `cdcbackfill drives an expand/contract schema change on a busy PostgreSQL table:

  expand    add the new columns under lock_timeout, retried
  backfill  fill them in throttled keyset batches from a replication slot's snapshot,
            while the slot's stream keeps every row the application changes in sync
  sync      keep them in sync until the application dual-writes
  verify    check parity over the whole table
  contract  drop the old column, the slot and the publication

Configuration: a YAML file (--config), every key overridable by the environment
(CDCBACKFILL_ + the key path with _, e.g. CDCBACKFILL_DATABASE_DSN) and by a flag
named after the key (e.g. --database.dsn, --backfill.batch_size).`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().String("config", "", "path of the migration's YAML config")
	addKeyFlags(root.PersistentFlags())
	root.AddCommand(runCmd(), planCmd(), statusCmd(), controlCmd("pause"), controlCmd("resume"),
		controlCmd("approve"), controlCmd("recover"), abortCmd(), demoCmd())
	return root
}

// addKeyFlags registers one hidden flag per config key, so any key can be
// set on the command line; config.Load reads only the ones that were set.
func addKeyFlags(fs *pflag.FlagSet) {
	for _, key := range config.Keys() {
		if config.ListKey(key) {
			fs.StringArray(key, nil, "config key "+key)
		} else {
			fs.String(key, "", "config key "+key)
		}
		_ = fs.MarkHidden(key)
		_ = fs.SetAnnotation(key, configKey, []string{"true"})
	}
}

// configKey marks the flags that are config keys, so a command's own flag
// of the same name (abort --rollback) is never read as one.
const configKey = "cdcbackfill-config-key"

// keyFlags is the set of config-key flags the user set on this command.
func keyFlags(cmd *cobra.Command) *pflag.FlagSet {
	fs := pflag.NewFlagSet("config keys", pflag.ContinueOnError)
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		if _, ok := f.Annotations[configKey]; ok {
			fs.AddFlag(f)
		}
	})
	return fs
}

// loadConfig reads --config plus environment and flags.
func loadConfig(cmd *cobra.Command) (*config.Config, error) {
	path, _ := cmd.Flags().GetString("config")
	if path == "" && os.Getenv("CDCBACKFILL_NAME") == "" {
		return nil, errors.New("no configuration: pass --config FILE (or set CDCBACKFILL_NAME, CDCBACKFILL_DATABASE_DSN, ... in the environment)")
	}
	return config.Load(path, keyFlags(cmd))
}
