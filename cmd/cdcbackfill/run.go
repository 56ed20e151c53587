package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/pprof"
	"time"

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
			r.Print(out)
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
