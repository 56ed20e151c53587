package phases

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
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
	case "recover":
		return recoverSlot(ctx, conn, cfg, store, st)
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

// recoverSlot is the way out of a lost slot (invalidated by the server, or
// dropped by hand): changes since its confirmed position are gone, so the
// migration starts its backfill again with a new slot and a fresh plan.
// Every row that exists is then recomputed from the table as it is, and
// every later change comes through the new slot: the correctness argument
// holds from the new consistent point. The expand DDL is not repeated.
func recoverSlot(ctx context.Context, conn *pgx.Conn, cfg *config.Config, store Store, st *State) (string, error) {
	if st.Phase != Backfill && st.Phase != Sync && st.Phase != Verify {
		return "", fmt.Errorf("recover: migration %q is in phase %s; recover applies in backfill, sync or verify", cfg.Name, st.Phase)
	}
	info, err := snapshot.LookupSlot(ctx, conn, cfg.SlotName())
	if err != nil {
		return "", err
	}
	if info.Exists && info.WALStatus != "lost" {
		return "", fmt.Errorf("recover: slot %s is fine (wal_status %s); nothing to recover", cfg.SlotName(), info.WALStatus)
	}
	var free bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended('cdcbackfill:' || $1, 0))`, cfg.Name).Scan(&free); err != nil {
		return "", err
	}
	if !free {
		return "", fmt.Errorf("recover: a daemon still runs migration %q; stop it first", cfg.Name)
	}
	if err := snapshot.DropSlot(ctx, conn, cfg.SlotName()); err != nil {
		return "", err
	}
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := store.Update(ctx, tx, `phase = 'backfill', phase_started_at = now(), plan = NULL, ranges = NULL,
			slot_lsn = NULL, rows_done = 0, rows_total = 0, verify_cursor = NULL, clean_since = NULL,
			verify_pass_started = NULL, clean_pass_started = NULL, approved_phase = NULL, error = NULL`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM cdcbackfill.retry_keys WHERE name = $1`, cfg.Name); err != nil {
			return err
		}
		return store.Event(ctx, tx, Backfill, "recover", map[string]any{"from": st.Phase, "slot_wal_status": info.WALStatus})
	})
	if err != nil {
		return "", fmt.Errorf("recover: %w", err)
	}
	return fmt.Sprintf("migration %q: lost slot dropped; `cdcbackfill run` now backfills again with a new slot (from phase %s)", cfg.Name, st.Phase), nil
}
