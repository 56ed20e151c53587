package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
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
	log.Info("starting", "migration", cfg.Name, "table", cfg.Table, "database", dbconn.RedactDSN(cfg.Database.DSN))
	if path := os.Getenv("CDCBACKFILL_CPUPROFILE"); path != "" {
		// For measuring where the daemon's CPU goes (make bench, by hand):
		// a pprof CPU profile of the whole run, written at exit.
		f, err := os.Create(path)
		if err != nil {
			return fmt.Errorf("CDCBACKFILL_CPUPROFILE: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("CDCBACKFILL_CPUPROFILE: %w", err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
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
		flag := func(name string) bool {
			f := cmd.Flags().Lookup(name)
			return f != nil && f.Value.String() == "true"
		}
		opts := phases.ControlOptions{Rollback: flag("rollback"), AcceptMismatches: flag("accept-mismatches"), Force: flag("force"),
			Progress: func(s string) { fmt.Fprintln(cmd.ErrOrStderr(), s) }}
		msg, err := phases.Control(cmd.Context(), cfg, action, opts)
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
		if !watch || r.Phase.Ended() {
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
// and ETA while a daemon runs, then the stream's and verify's figures, and
// what the phase waits for.
func printStatus(w io.Writer, r *phases.StatusReport) {
	state := "no daemon running"
	if r.Running {
		state = "daemon running"
	}
	if r.Paused {
		state += ", PAUSED"
	}
	fmt.Fprintf(w, "migration %s: phase %s (%s, since %s)\n", r.Name, r.Phase, state, r.PhaseStartedAt.Local().Format(time.DateTime))
	if r.Waiting != "" {
		fmt.Fprintf(w, "waiting for: %s\n", r.Waiting)
	}
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
	fmt.Fprint(w, strings.TrimSpace(drawn))
	if r.Running {
		// A rate and an ETA mean something only while a daemon works.
		fmt.Fprintf(w, "  %.0f rows/s", r.Backfill.RowsPerSecond)
		if r.Backfill.EtaSeconds > 0 {
			fmt.Fprintf(w, ", ETA %s", (time.Duration(r.Backfill.EtaSeconds) * time.Second).String())
		}
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "sync: slot lag %s (%.1fs), events %d, corrections %d\n", units.BytesSize(float64(r.Sync.LagBytes)), r.Sync.LagSeconds, r.Sync.Events, r.Sync.Corrections)
	if r.Sync.Correction == config.CorrectionDeferred && r.Phase == "sync" {
		fmt.Fprintf(w, "      deferred corrections: %d keys waiting, the oldest %.1fs (sync.defer_for %s)\n", r.Sync.DeferredKeys, r.Sync.LagSeconds,
			(time.Duration(r.Sync.DeferFor * float64(time.Second))).String())
	}
	if len(r.Sync.CorrectionSamples) > 0 {
		fmt.Fprintf(w, "      recent corrections (the application does not write these as the expressions say): %s\n", strings.Join(r.Sync.CorrectionSamples, " "))
	}
	if dw := r.Sync.DualWrite; dw != nil {
		fmt.Fprintf(w, "      dual-write evidence: %d of %d writes, quiet %s of %s (stream time)\n", dw.Evidence, dw.MinEvidence,
			(time.Duration(dw.QuietSeconds) * time.Second).String(), (time.Duration(dw.QuietPeriodSeconds) * time.Second).String())
	}
	v := r.Verify
	fmt.Fprintf(w, "verify: rows checked %d, out of parity now %d (found %d, accepted %d), hold proven %s of %s\n",
		v.RowsChecked, v.Mismatches, v.MismatchesFound, v.Accepted,
		(time.Duration(v.HoldProven) * time.Second).String(), (time.Duration(v.Hold) * time.Second).String())
	for _, m := range v.MismatchSamples {
		fmt.Fprintf(w, "      %s\n", m)
	}
	if v.PrematureDetections > 0 {
		fmt.Fprintf(w, "      premature dual-write detections: %d (each sent the migration back to sync)\n", v.PrematureDetections)
	}
	for _, u := range v.OldColumnStatements {
		fmt.Fprintf(w, "      still uses the old column: %q (%d calls during the hold)\n", u.Query, u.Calls)
	}
	if c := r.Contract.Cutover; c != nil {
		fmt.Fprintf(w, "contract: cut-over in %d tries; longest application stall %.1f ms (lock wait %.1f ms, held %.1f ms, %d keys checked under the lock)\n",
			c.Tries, c.LongestStallMS, c.LockWaitMS, c.HeldMS, c.KeysChecked)
	}
	if r.Throttle != "" {
		fmt.Fprintf(w, "throttled: %s\n", r.Throttle)
	}
	if r.Error != nil {
		fmt.Fprintf(w, "last error: %s\n", *r.Error)
	}
}
