package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/phases"
)

// newLogger builds the slog logger of log.level and log.format.
func newLogger(cfg *config.Config, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Log.Level))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Log.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func runE(cmd *cobra.Command, _ []string) error {
	cfg, err := loadConfig(cmd)
	if err != nil {
		return err
	}
	log := newLogger(cfg, os.Stderr)
	log.Info("starting", "migration", cfg.Name, "table", cfg.Table, "database", config.RedactDSN(cfg.Database.DSN))
	if err := phases.Run(cmd.Context(), cfg, log); err != nil {
		return err
	}
	if cmd.Context().Err() != nil {
		log.Info("stopped by signal; state saved, run again to resume")
	}
	return nil
}

func controlE(action string) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, _ []string) error {
		cfg, err := loadConfig(cmd)
		if err != nil {
			return err
		}
		rollback := false
		if f := cmd.Flags().Lookup("rollback"); f != nil {
			rollback = f.Value.String() == "true"
		}
		msg, err := phases.Control(cmd.Context(), cfg, action, rollback)
		if err != nil {
			return err
		}
		fmt.Fprintln(cmd.OutOrStdout(), msg)
		return nil
	}
}

func statusE(cmd *cobra.Command, _ []string) error {
	cfg, err := loadConfig(cmd)
	if err != nil {
		return err
	}
	asJSON, _ := cmd.Flags().GetBool("json")
	watch, _ := cmd.Flags().GetBool("watch")
	out := cmd.OutOrStdout()
	for {
		r, err := phases.Status(cmd.Context(), cfg)
		if err != nil {
			return err
		}
		if asJSON {
			enc := json.NewEncoder(out)
			if err := enc.Encode(r); err != nil {
				return err
			}
		} else {
			if watch {
				fmt.Fprint(out, "\033[H\033[2J") // redraw in place
			}
			printStatus(out, r)
		}
		if !watch || r.Phase == phases.Done || r.Phase == phases.Aborted {
			return nil
		}
		select {
		case <-cmd.Context().Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// printStatus renders the status for a person: a progress bar with rows/s
// and ETA, then the stream's figures.
func printStatus(w io.Writer, r *phases.StatusReport) {
	state := "no daemon running"
	if r.Running {
		state = "daemon running"
	}
	if r.Paused {
		state += ", PAUSED"
	}
	fmt.Fprintf(w, "migration %s: phase %s (%s, since %s)\n", r.Name, r.Phase, state, r.PhaseStartedAt.Local().Format(time.DateTime))
	total := max(r.Backfill.RowsTotal, r.Backfill.RowsDone, 1)
	var sb strings.Builder
	bar := progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(&sb),
		progressbar.OptionSetDescription("backfill"),
		progressbar.OptionSetWidth(30),
		progressbar.OptionShowCount(),
		progressbar.OptionThrottle(0),
	)
	_ = bar.Set64(r.Backfill.RowsDone)
	// The bar redraws with \r; only its last drawing is wanted here.
	drawn := sb.String()
	if i := strings.LastIndex(drawn, "\r"); i >= 0 {
		drawn = drawn[i+1:]
	}
	fmt.Fprintf(w, "%s  %.0f rows/s", strings.TrimSpace(drawn), r.Backfill.RowsPerSecond)
	if r.Backfill.EtaSeconds > 0 {
		fmt.Fprintf(w, ", ETA %s", (time.Duration(r.Backfill.EtaSeconds) * time.Second).String())
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "sync: slot lag %s (%.1fs), events %d, corrections %d\n", humanBytes(r.Sync.LagBytes), r.Sync.LagSeconds, r.Sync.Events, r.Sync.Corrections)
	if len(r.Sync.CorrectionSamples) > 0 {
		fmt.Fprintf(w, "      recent corrections (the application does not write these as the expressions say): %s\n", strings.Join(r.Sync.CorrectionSamples, " "))
	}
	fmt.Fprintf(w, "verify: rows checked %d, mismatches %d\n", r.Verify.RowsChecked, r.Verify.Mismatches)
	if len(r.Verify.MismatchSamples) > 0 {
		fmt.Fprintf(w, "      mismatch samples: %s\n", strings.Join(r.Verify.MismatchSamples, " "))
	}
	if r.Throttle != "" {
		fmt.Fprintf(w, "throttled: %s\n", r.Throttle)
	}
	if r.Error != nil {
		fmt.Fprintf(w, "last error: %s\n", *r.Error)
	}
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
