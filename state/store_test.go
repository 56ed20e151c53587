package state_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
	"github.com/cdcbackfill/cdcbackfill/state"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// newStore creates the schema and a migration in a fresh database.
func newStore(t *testing.T) (state.Store, *pgx.Conn) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	if err := state.EnsureSchema(ctx, conn, time.Second); err != nil {
		t.Fatal(err)
	}
	s := state.Store{Name: "m1"}
	if err := s.Create(ctx, conn); err != nil {
		t.Fatal(err)
	}
	return s, conn
}

func load(t *testing.T, s state.Store, conn *pgx.Conn) *state.Migration {
	t.Helper()
	m, err := s.Load(context.Background(), conn)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestLoadMissing(t *testing.T) {
	conn, err := pgx.Connect(context.Background(), pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := (state.Store{Name: "x"}).Load(context.Background(), conn); !errors.Is(err, state.ErrNoMigration) {
		t.Errorf("Load before the schema exists = %v, want ErrNoMigration", err)
	}
}

// TestEnsureSchemaOnlyWhenNeeded: with the schema complete, EnsureSchema
// runs no DDL, so a reader holding the state table does not hold it up; a
// missing column is added.
func TestEnsureSchemaOnlyWhenNeeded(t *testing.T) {
	ctx := context.Background()
	s, conn := newStore(t)
	reader, err := pgx.Connect(ctx, conn.Config().ConnString())
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close(ctx)
	if _, err := reader.Exec(ctx, "BEGIN; SELECT count(*) FROM cdcbackfill.migrations"); err != nil {
		t.Fatal(err)
	}
	if err := state.EnsureSchema(ctx, conn, 100*time.Millisecond); err != nil {
		t.Fatalf("EnsureSchema with the schema complete and its table read: %v", err)
	}
	if _, err := reader.Exec(ctx, "COMMIT"); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "ALTER TABLE cdcbackfill.migrations DROP COLUMN cutover"); err != nil {
		t.Fatal(err)
	}
	if err := state.EnsureSchema(ctx, conn, time.Second); err != nil {
		t.Fatal(err)
	}
	if m := load(t, s, conn); m.Cutover != nil {
		t.Errorf("cutover %+v after the column was added back", m.Cutover)
	}
}

func TestMoveChecksWhereItIs(t *testing.T) {
	ctx := context.Background()
	s, conn := newStore(t)
	if err := s.Move(ctx, conn, state.Expand, state.Backfill, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Move(ctx, conn, state.Expand, state.Backfill, nil); err == nil {
		t.Error("a second move from expand succeeded")
	}
	if m := load(t, s, conn); m.Phase != state.Backfill {
		t.Errorf("phase %s", m.Phase)
	}
}

// TestAbortIsRefusedOnceTheContractDDLCommitted: the refusal is in the
// request itself, so it cannot race the cut-over.
func TestAbortIsRefusedOnceTheContractDDLCommitted(t *testing.T) {
	ctx := context.Background()
	s, conn := newStore(t)
	for _, p := range [][2]state.Phase{{state.Expand, state.Backfill}, {state.Backfill, state.Sync}} {
		if err := s.Move(ctx, conn, p[0], p[1], nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.HandOver(ctx, conn, 0x1000, map[string]any{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Move(ctx, conn, state.Verify, state.Contract, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.RequestAbort(ctx, conn, true); err != nil {
		t.Fatalf("abort in contract before the DDL: %v", err)
	}
	if _, err := conn.Exec(ctx, "UPDATE cdcbackfill.migrations SET abort_requested = false"); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordCutover(ctx, conn, 1, state.Cutover{Tries: 1}); err != nil {
		t.Fatal(err)
	}
	if err := s.RequestAbort(ctx, conn, false); !errors.Is(err, state.ErrTooLate) {
		t.Errorf("abort after the contract DDL = %v, want ErrTooLate", err)
	}
	if m := load(t, s, conn); m.AbortRequested {
		t.Error("abort recorded after the contract DDL")
	}
}

// TestHandOverAndBack: the hand-over records who owns the new columns from
// where; a premature one goes back to sync, counted, with the rows it kept
// forgotten.
func TestHandOverAndBack(t *testing.T) {
	ctx := context.Background()
	s, conn := newStore(t)
	for _, p := range [][2]state.Phase{{state.Expand, state.Backfill}, {state.Backfill, state.Sync}} {
		if err := s.Move(ctx, conn, p[0], p[1], nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.HandOver(ctx, conn, pglogrepl.LSN(0x16B3748), map[string]any{"by": "test"}); err != nil {
		t.Fatal(err)
	}
	m := load(t, s, conn)
	if m.Phase != state.Verify || m.HandoverLSN == nil || *m.HandoverLSN != 0x16B3748 {
		t.Fatalf("after HandOver: phase %s handover %v", m.Phase, m.HandoverLSN)
	}
	if err := s.CreditHold(ctx, conn, 1500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if m := load(t, s, conn); m.HoldProven != 1500*time.Millisecond {
		t.Errorf("hold proven %s", m.HoldProven)
	}
	v := "x"
	if err := s.RecordMismatches(ctx, conn, []recompute.Mismatch{{Key: recompute.Key{"7"}, Actual: []*string{&v}, Expected: []*string{nil}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.BackToSync(ctx, conn, state.Verify, map[string]any{}); err != nil {
		t.Fatal(err)
	}
	m = load(t, s, conn)
	if m.Phase != state.Sync || m.HandoverLSN != nil || m.PrematureDetections != 1 || m.HoldProven != 0 {
		t.Errorf("after BackToSync: phase %s handover %v premature %d hold %s", m.Phase, m.HandoverLSN, m.PrematureDetections, m.HoldProven)
	}
	if n, _, err := s.Outstanding(ctx, conn, 10); err != nil || n != 0 {
		t.Errorf("rows kept after going back to sync: %d (%v)", n, err)
	}
}

// TestMismatchesKeptUntilFixedOrAccepted: a row out of parity is kept with
// both values; found in parity again it goes; accepted it no longer counts,
// unless its values change.
func TestMismatchesKeptUntilFixedOrAccepted(t *testing.T) {
	ctx := context.Background()
	s, conn := newStore(t)
	str := func(v string) *string { return &v }
	row := func(key, actual string) recompute.Mismatch {
		return recompute.Mismatch{Key: recompute.Key{key}, Actual: []*string{str(actual)}, Expected: []*string{str("Mary")}}
	}
	if err := s.RecordMismatches(ctx, conn, []recompute.Mismatch{row("7", "Mary Ann"), row("8", "Jo")}); err != nil {
		t.Fatal(err)
	}
	n, rows, err := s.Outstanding(ctx, conn, 10)
	if err != nil || n != 2 || len(rows) != 2 || *rows[0].Actual[0] == "" {
		t.Fatalf("Outstanding = %d %+v %v", n, rows, err)
	}
	if got, err := s.ClearMismatches(ctx, conn, []recompute.Key{{"8"}, {"9"}}); err != nil || got != 1 {
		t.Errorf("ClearMismatches = %d, %v; want 1", got, err)
	}
	if got, err := s.AcceptMismatches(ctx, conn, state.Verify); err != nil || got != 1 {
		t.Errorf("AcceptMismatches = %d, %v; want 1", got, err)
	}
	if n, _, _ := s.Outstanding(ctx, conn, 10); n != 0 {
		t.Errorf("%d outstanding after accepting", n)
	}
	// The same values again: still accepted. Other values: it counts again.
	if err := s.RecordMismatches(ctx, conn, []recompute.Mismatch{row("7", "Mary Ann")}); err != nil {
		t.Fatal(err)
	}
	if n, _, _ := s.Outstanding(ctx, conn, 10); n != 0 {
		t.Errorf("an accepted row seen again with the same values counts: %d", n)
	}
	if err := s.RecordMismatches(ctx, conn, []recompute.Mismatch{row("7", "Mary-Ann")}); err != nil {
		t.Fatal(err)
	}
	if n, _, _ := s.Outstanding(ctx, conn, 10); n != 1 {
		t.Errorf("an accepted row with new values does not count: %d", n)
	}
	m := load(t, s, conn)
	if m.AcceptedMismatches != 1 || m.VerifyMismatches != 4 {
		t.Errorf("accepted %d found %d, want 1 and 4", m.AcceptedMismatches, m.VerifyMismatches)
	}
}
