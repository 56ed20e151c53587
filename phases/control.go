package phases

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cdcbackfill/cdcbackfill/config"
)

// Control carries out an operator's command through the state row, so any
// host that reaches the database can steer. It returns what was done.
func Control(ctx context.Context, cfg *config.Config, action string, rollback bool) (string, error) {
	conn, err := Connect(ctx, cfg.Database.DSN)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.Background())
	store := Store{Name: cfg.Name}
	st, err := store.Load(ctx, conn)
	if err != nil {
		if errors.Is(err, ErrNoMigration) {
			return "", fmt.Errorf("%w; start it with `cdcbackfill run --config ...`", err)
		}
		return "", err
	}
	switch action {
	case "pause", "resume":
		if st.Phase == Done || st.Phase == Aborted {
			return "", fmt.Errorf("%s: migration %q is %s", action, cfg.Name, st.Phase)
		}
		if err := store.Update(ctx, conn, "paused = $2", action == "pause"); err != nil {
			return "", err
		}
		if err := store.Event(ctx, conn, st.Phase, action, nil); err != nil {
			return "", err
		}
		if action == "pause" {
			return fmt.Sprintf("migration %q paused in phase %s: batches stop within a second; the stream keeps the table in sync", cfg.Name, st.Phase), nil
		}
		return fmt.Sprintf("migration %q resumed in phase %s", cfg.Name, st.Phase), nil
	case "approve":
		if st.Phase != Sync && st.Phase != Contract {
			return "", fmt.Errorf("approve: migration %q is in phase %s; approve applies in sync (the application dual-writes) or contract (drop the old column)", cfg.Name, st.Phase)
		}
		if err := store.Update(ctx, conn, "approved_phase = $2", st.Phase); err != nil {
			return "", err
		}
		if err := store.Event(ctx, conn, st.Phase, "approve", nil); err != nil {
			return "", err
		}
		return fmt.Sprintf("migration %q: %s approved", cfg.Name, st.Phase), nil
	case "abort":
		return abort(ctx, cfg, store, st, rollback)
	}
	return "", fmt.Errorf("unknown action %q", action)
}

// abort asks the daemon to abort; when no daemon holds the migration, it
// does the abort itself.
func abort(ctx context.Context, cfg *config.Config, store Store, st *State, rollback bool) (string, error) {
	conn, err := Connect(ctx, cfg.Database.DSN)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.Background())
	if st.Phase == Aborted {
		return fmt.Sprintf("migration %q is already aborted", cfg.Name), nil
	}
	if st.Phase == Done || st.Phase == Contract && st.ContractDone > 0 {
		return "", fmt.Errorf("abort: migration %q is past the contract DDL (phase %s): it cannot be aborted", cfg.Name, st.Phase)
	}
	if err := store.Update(ctx, conn, "abort_requested = true, rollback_requested = $2", rollback); err != nil {
		return "", err
	}
	if err := store.Event(ctx, conn, st.Phase, "abort", map[string]any{"rollback": rollback}); err != nil {
		return "", err
	}
	var got bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended('cdcbackfill:' || $1, 0))`, cfg.Name).Scan(&got); err != nil {
		return "", err
	}
	if got {
		p := abortPlan{slot: cfg.SlotName(), publication: cfg.PublicationName(), originPrefix: cfg.OriginPrefix(),
			rollback: cfg.Rollback, runner: DDLRunner{LockTimeout: cfg.DDL.LockTimeout, MaxRetries: cfg.DDL.MaxRetries, Table: cfg.QuotedTable()}}
		if err := abortNow(ctx, conn, store, p); err != nil {
			return "", err
		}
		return fmt.Sprintf("migration %q aborted%s; slot and publication dropped", cfg.Name, map[bool]string{true: " and rolled back", false: ""}[rollback]), nil
	}
	// A daemon runs it: wait for it to finish the abort.
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return "", err
		}
		cur, err := store.Load(ctx, conn)
		if err != nil {
			return "", err
		}
		if cur.Phase == Aborted {
			return fmt.Sprintf("migration %q aborted by its daemon%s", cfg.Name, map[bool]string{true: " and rolled back", false: ""}[rollback]), nil
		}
	}
	return "", fmt.Errorf("abort requested, but the running daemon has not finished it within 2m; see its log")
}
