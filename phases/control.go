package phases

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/config"
	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/ddl"
	"github.com/cdcbackfill/cdcbackfill/internal/pgfeature"
	"github.com/cdcbackfill/cdcbackfill/snapshot"
	"github.com/cdcbackfill/cdcbackfill/state"
)

// ControlOptions are the flags of the operator's commands.
type ControlOptions struct {
	Rollback         bool // abort: run the rollback statements too
	AcceptMismatches bool // approve: accept the rows out of parity as the application wrote them
	Force            bool // approve: contract although statements still use the old column
	// Progress, when set, is told what abort waits for while a daemon
	// carries it out.
	Progress func(string)
}

// Control carries out an operator's command through the state row, so any
// host that reaches the database can steer. It returns what was done.
func Control(ctx context.Context, cfg *config.Config, action string, opts ControlOptions) (string, error) {
	conn, err := dbconn.Connect(ctx, cfg.Database.DSN)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.Background())
	store := state.Store{Name: cfg.Name}
	st, err := store.Load(ctx, conn)
	if err != nil {
		if errors.Is(err, state.ErrNoMigration) {
			return "", fmt.Errorf("%w; start it with `cdcbackfill run --config ...`", err)
		}
		return "", err
	}
	switch action {
	case "pause", "resume":
		if st.Phase.Ended() {
			return "", fmt.Errorf("%s: migration %q is %s", action, cfg.Name, st.Phase)
		}
		if err := store.SetPaused(ctx, conn, st.Phase, action == "pause"); err != nil {
			return "", err
		}
		if action == "pause" {
			return fmt.Sprintf("migration %q paused in phase %s: batches stop within a second and no phase change happens; the stream keeps the table in sync", cfg.Name, st.Phase), nil
		}
		return fmt.Sprintf("migration %q resumed in phase %s", cfg.Name, st.Phase), nil
	case "approve":
		return approve(ctx, conn, cfg, store, st, opts)
	case "abort":
		return abort(ctx, conn, cfg, store, st, opts)
	case "recover":
		return recoverSlot(ctx, conn, cfg, store, st)
	}
	return "", fmt.Errorf("unknown action %q", action)
}

// approve records the operator's approval: of dual-write in sync, of the
// contract in contract; --accept-mismatches in verify or contract accepts
// the rows out of parity as the application wrote them.
func approve(ctx context.Context, conn *pgx.Conn, cfg *config.Config, store state.Store, st *state.Migration, opts ControlOptions) (string, error) {
	var msgs []string
	if opts.AcceptMismatches {
		if st.Phase != state.Verify && st.Phase != state.Contract {
			return "", fmt.Errorf("approve --accept-mismatches: migration %q is in phase %s; rows out of parity are kept in verify and contract only", cfg.Name, st.Phase)
		}
		n, err := store.AcceptMismatches(ctx, conn, st.Phase)
		if err != nil {
			return "", err
		}
		msgs = append(msgs, fmt.Sprintf("migration %q: %d rows out of parity accepted as the application wrote them; they no longer hold the contract, and are recorded in the event log", cfg.Name, n))
		if st.Phase == state.Verify {
			return msgs[0], nil
		}
	}
	if st.Phase != state.Sync && st.Phase != state.Contract {
		return "", fmt.Errorf("approve: migration %q is in phase %s; approve applies in sync (the application dual-writes) or contract (drop the old column); in verify, --accept-mismatches accepts rows out of parity", cfg.Name, st.Phase)
	}
	if st.Phase == state.Contract && st.OldUsage != nil && len(st.OldUsage.Still) > 0 && !opts.Force {
		return "", fmt.Errorf("approve: statements that use the old column without the new ones ran during the hold (see `cdcbackfill status`), e.g. %q (%d calls); make sure nothing needs the old column, then approve --force",
			st.OldUsage.Still[0].Query, st.OldUsage.Still[0].Calls)
	}
	if st.Phase == state.Sync {
		lsn, err := store.ApproveDualWrite(ctx, conn)
		if errors.Is(err, state.ErrNotInSync) {
			return "", fmt.Errorf("approve: migration %q left sync meanwhile; see cdcbackfill status", cfg.Name)
		}
		if err != nil {
			return "", fmt.Errorf("approve: %w", err)
		}
		return fmt.Sprintf("migration %q: dual-write approved at WAL position %s: from now on the application owns %s; the daemon will not write them",
			cfg.Name, lsn, strings.Join(cfg.ColumnNames(), ", ")), nil
	}
	if err := store.Approve(ctx, conn, st.Phase, opts.Force); err != nil {
		return "", err
	}
	msgs = append(msgs, fmt.Sprintf("migration %q: %s approved", cfg.Name, st.Phase))
	if len(msgs) == 2 {
		return msgs[0] + "\n" + msgs[1], nil
	}
	return msgs[0], nil
}

// abort asks the daemon to abort; when no daemon holds the migration, it
// does the abort itself. It never gives up while a daemon carries it out:
// it reports what it waits for, and it fails at once when the abort is too
// late (the contract DDL committed) or the daemon stopped on an error.
func abort(ctx context.Context, conn *pgx.Conn, cfg *config.Config, store state.Store, st *state.Migration, opts ControlOptions) (string, error) {
	if st.Phase == state.Aborted {
		return fmt.Sprintf("migration %q is already aborted", cfg.Name), nil
	}
	if err := store.RequestAbort(ctx, conn, opts.Rollback); err != nil {
		if errors.Is(err, state.ErrTooLate) {
			if cur, lerr := store.Load(ctx, conn); lerr == nil {
				st = cur
			}
			return "", tooLate(cfg.Name, st)
		}
		return "", err
	}
	if err := store.Event(ctx, conn, st.Phase, "abort", map[string]any{"rollback": opts.Rollback}); err != nil {
		return "", err
	}
	done := func(by string) string {
		rb := ""
		if opts.Rollback {
			rb = " and rolled back"
		}
		return fmt.Sprintf("migration %q aborted%s%s; slot and publication dropped", cfg.Name, by, rb)
	}
	requested := time.Now()
	lastSaid := time.Now()
	for {
		cur, err := store.Load(ctx, conn)
		if err != nil {
			return "", err
		}
		switch {
		case cur.Phase == state.Aborted:
			return done(" by its daemon"), nil
		case !abortable(cur):
			return "", tooLate(cfg.Name, cur)
		}
		got, err := dbconn.TryLeaderLock(ctx, conn, cfg.Name)
		if err != nil {
			return "", err
		}
		if got {
			// No daemon runs it (or the one that did has stopped): do it
			// here. The lock is held until this connection closes.
			if err := abortHere(ctx, conn, cfg, store); err != nil {
				return "", err
			}
			return done(""), nil
		}
		if opts.Progress != nil && time.Since(lastSaid) >= 5*time.Second {
			opts.Progress(fmt.Sprintf("abort: the daemon is carrying it out (phase %s, %s so far)", cur.Phase, time.Since(requested).Round(time.Second)))
			lastSaid = time.Now()
		}
		if err := dbconn.Sleep(ctx, 200*time.Millisecond); err != nil {
			return "", fmt.Errorf("abort requested and recorded; the daemon carries it out (check with cdcbackfill status): %w", err)
		}
	}
}

// abortHere carries out the abort in this process, for a migration no
// daemon runs.
func abortHere(ctx context.Context, conn *pgx.Conn, cfg *config.Config, store state.Store) error {
	v, err := pgfeature.ServerVersion(ctx, conn)
	if err != nil {
		return err
	}
	finish, err := ddl.PlanFor(cfg, v)
	if err != nil {
		return fmt.Errorf("abort: %w", err)
	}
	p := abortPlan{slot: cfg.SlotName(), publication: cfg.PublicationName(), originPrefix: cfg.OriginPrefix(),
		rollback: cfg.Rollback, undo: finish.Undo, table: cfg.QuotedTable(), runner: DDLRunner{LockTimeout: cfg.DDL.LockTimeout, MaxRetries: cfg.DDL.MaxRetries, Table: cfg.QuotedTable()}}
	return abortNow(ctx, conn, store, p)
}

// recoverSlot is the way out of a lost slot (invalidated by the server, or
// dropped by hand): changes since its confirmed position are gone, so the
// migration starts its backfill again with a new slot and a fresh plan.
// Every row that exists is then recomputed from the table as it is, and
// every later change comes through the new slot: the correctness argument
// holds from the new consistent point. The expand DDL is not repeated.
func recoverSlot(ctx context.Context, conn *pgx.Conn, cfg *config.Config, store state.Store, st *state.Migration) (string, error) {
	if st.Phase != state.Backfill && st.Phase != state.Sync && st.Phase != state.Verify {
		return "", fmt.Errorf("recover: migration %q is in phase %s; recover applies in backfill, sync or verify", cfg.Name, st.Phase)
	}
	info, err := snapshot.LookupSlot(ctx, conn, cfg.SlotName())
	if err != nil {
		return "", err
	}
	if info.Exists && !info.Lost() {
		return "", fmt.Errorf("recover: slot %s is fine (wal_status %s); nothing to recover", cfg.SlotName(), info.WALStatus)
	}
	free, err := dbconn.TryLeaderLock(ctx, conn, cfg.Name)
	if err != nil {
		return "", err
	}
	if !free {
		return "", fmt.Errorf("recover: a daemon still runs migration %q; stop it first", cfg.Name)
	}
	if err := snapshot.DropSlot(ctx, conn, cfg.SlotName()); err != nil {
		return "", err
	}
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		return store.Restart(ctx, tx, st.Phase, info.WALStatus)
	})
	if err != nil {
		return "", fmt.Errorf("recover: %w", err)
	}
	return fmt.Sprintf("migration %q: lost slot dropped; `cdcbackfill run` now backfills again with a new slot (from phase %s)", cfg.Name, st.Phase), nil
}
