package applier_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/cdcbackfill/cdcbackfill/applier"
	"github.com/cdcbackfill/cdcbackfill/cdc"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
	"github.com/cdcbackfill/cdcbackfill/internal/recompute"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// waitTimeout bounds every wait on a condition; things normally happen in
// milliseconds, so only a bug reaches it.
const waitTimeout = 60 * time.Second

const usersDDL = `CREATE TABLE users (id bigint PRIMARY KEY, full_name text, first_name text, last_name text)`

// splitName is the running example: full_name split into two new columns.
var splitName = []recompute.Column{
	{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"},
	{Name: "last_name", Expr: "split_part(full_name, ' ', 2)"},
}

// outOfParity counts the rows whose new columns differ from their
// expressions, written independently of recompute.
const outOfParity = `SELECT count(*) FROM %s
WHERE (first_name, last_name) IS DISTINCT FROM (split_part(full_name, ' ', 1), split_part(full_name, ' ', 2))`

// fixture is a fresh database with one table and an applier over it.
type fixture struct {
	t     *testing.T
	dsn   string
	db    *pgx.Conn // the test's own connection
	table *recompute.Table
}

func newFixture(t *testing.T, name string, cols []recompute.Column, ddl ...string) *fixture {
	t.Helper()
	f := &fixture{t: t, dsn: pgtest.NewDatabase(t)}
	f.db = connect(t, f.dsn)
	for _, sql := range ddl {
		f.exec(sql)
	}
	table, err := recompute.Inspect(context.Background(), f.db, "public", name, cols)
	if err != nil {
		t.Fatal(err)
	}
	f.table = table
	return f
}

// newUsers seeds users with n rows, every one out of parity (new columns
// NULL).
func newUsers(t *testing.T, n int) *fixture {
	t.Helper()
	f := newFixture(t, "users", splitName, usersDDL)
	f.exec(`INSERT INTO users (id, full_name) SELECT i, 'First' || i || ' Last' || i FROM generate_series(1, $1) i`, n)
	return f
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func (f *fixture) exec(sql string, args ...any) {
	f.t.Helper()
	execOn(f.t, f.db, sql, args...)
}

func execOn(t *testing.T, conn *pgx.Conn, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func (f *fixture) count(sql string, args ...any) int64 {
	f.t.Helper()
	var n int64
	if err := f.db.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		f.t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func (f *fixture) outOfParity() int64 {
	f.t.Helper()
	return f.count(fmt.Sprintf(outOfParity, f.table.Ident()))
}

func (f *fixture) lsn(sql string, args ...any) pglogrepl.LSN {
	f.t.Helper()
	var s *string
	if err := f.db.QueryRow(context.Background(), sql, args...).Scan(&s); err != nil {
		f.t.Fatalf("%s: %v", sql, err)
	}
	if s == nil {
		return 0
	}
	lsn, err := pglogrepl.ParseLSN(*s)
	if err != nil {
		f.t.Fatal(err)
	}
	return lsn
}

// running is an applier fed by the test through events.
type running struct {
	t      *testing.T
	a      *applier.Applier
	events chan cdc.Event
	done   chan error
	cancel context.CancelFunc
	closed bool
}

func testConfig(t *testing.T) applier.Config {
	return applier.Config{
		FlushInterval: 20 * time.Millisecond,
		MaxBatchKeys:  1000,
		Logger:        slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// start runs an applier on a connection of its own, confirmed from start.
func (f *fixture) start(cfg applier.Config, start pglogrepl.LSN) *running {
	f.t.Helper()
	a := applier.New(connect(f.t, f.dsn), f.table, cfg)
	a.SetConfirmed(start)
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{t: f.t, a: a, events: make(chan cdc.Event, 64), done: make(chan error, 1), cancel: cancel}
	go func() { r.done <- a.Run(ctx, r.events) }()
	f.t.Cleanup(func() {
		if err := r.stop(); err != nil {
			f.t.Errorf("Run: %v", err)
		}
	})
	return r
}

// close closes the input and returns Run's error.
func (r *running) close() error {
	r.t.Helper()
	if !r.closed {
		r.closed = true
		close(r.events)
	}
	select {
	case err := <-r.done:
		r.done <- err
		return err
	case <-time.After(waitTimeout):
		r.t.Fatal("Run did not return after its input was closed")
	}
	return nil
}

// stop cancels Run and returns its error.
func (r *running) stop() error {
	r.cancel()
	select {
	case err := <-r.done:
		r.done <- err
		return err
	case <-time.After(waitTimeout):
		return errors.New("Run did not return after cancel")
	}
}

func (r *running) send(evs ...cdc.Event) {
	r.t.Helper()
	for _, ev := range evs {
		select {
		case r.events <- ev:
			continue
		default:
		}
		select {
		case r.events <- ev:
		case err := <-r.done:
			r.done <- err
			r.t.Fatalf("Run returned early: %v", err)
		case <-time.After(waitTimeout):
			r.t.Fatal("applier does not read its input")
		}
	}
}

// waitApplied waits until the applier has confirmed lsn.
func (r *running) waitApplied(lsn pglogrepl.LSN) {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := r.a.WaitApplied(ctx, lsn); err != nil {
		r.t.Fatal(err)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// txn is the events of one transaction on users, committed at final, with
// its commit record ending at end.
func txn(final, end pglogrepl.LSN, ids ...int) []cdc.Event {
	evs := []cdc.Event{{Kind: cdc.Begin, FinalLSN: final, CommitTime: time.Now()}}
	for _, id := range ids {
		evs = append(evs, change(final, strconv.Itoa(id)))
	}
	return append(evs, cdc.Event{Kind: cdc.Commit, CommitLSN: final, EndLSN: end, CommitTime: time.Now()})
}

var idColumn = []string{"id"}

func change(final pglogrepl.LSN, id string) cdc.Event {
	return cdc.Event{Kind: cdc.Change, FinalLSN: final, Relation: "public.users", KeyColumns: idColumn, Key: []string{id}}
}

func TestAppliesChangedKeys(t *testing.T) {
	f := newUsers(t, 1000)
	f.exec(`UPDATE users SET first_name = split_part(full_name, ' ', 1), last_name = split_part(full_name, ' ', 2)`)
	f.exec(`UPDATE users SET full_name = 'Ada Lovelace' WHERE id <= 50`)
	f.exec(`UPDATE users SET full_name = 'Grace' WHERE id > 950`)
	if n := f.outOfParity(); n != 100 {
		t.Fatalf("%d rows out of parity before, want 100", n)
	}
	r := f.start(testConfig(t), 0x100)

	var ids1, ids2 []int
	for i := 1; i <= 50; i++ {
		ids1 = append(ids1, i, 500+i) // 500+i is in parity already
	}
	for i := 951; i <= 1000; i++ {
		ids2 = append(ids2, i, i) // coalesced
	}
	r.send(txn(0x1000, 0x1100, ids1...)...)
	r.send(txn(0x2000, 0x2100, ids2...)...)
	r.waitApplied(0x2100)

	if n := f.outOfParity(); n != 0 {
		t.Errorf("%d rows out of parity after the flush", n)
	}
	st := r.a.Stats()
	if st.Corrections != 100 {
		t.Errorf("Corrections = %d, want 100", st.Corrections)
	}
	if st.ConfirmedLSN != 0x2100 || r.a.ConfirmedLSN() != 0x2100 {
		t.Errorf("confirmed %s / %s, want the last Commit's EndLSN 0/2100", st.ConfirmedLSN, r.a.ConfirmedLSN())
	}
	if st.PendingKeys != 0 || st.Flushes == 0 || st.Events != uint64(len(ids1)+2+len(ids2)+2) {
		t.Errorf("stats %+v", st)
	}

	// Idle moves confirmed on to the server's WAL end when nothing waits.
	r.send(cdc.Event{Kind: cdc.Idle, EndLSN: 0x3000})
	r.waitApplied(0x3000)
	if err := r.close(); err != nil {
		t.Fatal(err)
	}
}

func TestHeldKeyHoldsConfirmed(t *testing.T) {
	for _, tc := range []struct {
		name, key string
	}{
		{"key as PostgreSQL prints it", "5"},
		{"key in another text form", "05"}, // comes back skipped as "5"
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newUsers(t, 10)
			cfg := testConfig(t)
			r := f.start(cfg, 0x100)

			// The application holds row 5 (out of parity) in an open transaction.
			locker := connect(t, f.dsn)
			execOn(t, locker, "BEGIN")
			execOn(t, locker, "SELECT * FROM users WHERE id = 5 FOR UPDATE")

			r.send(txn(0x1000, 0x1100, 1, 2, 3)...)
			r.waitApplied(0x1100)
			if n := r.a.Stats().LockedFlushes; n != 0 {
				t.Errorf("rows nobody holds: %d statements locked ahead, want the plain UPDATE", n)
			}
			b := txn(0x2000, 0x2100, 4)
			b = append(b[:2], change(0x2000, tc.key), b[2])
			r.send(b...)

			// Row 4 is applied, row 5 skipped and retried: confirmed stays at
			// the start of the holding transaction's commit.
			held := time.Now()
			waitFor(t, "three retries of the held key", func() bool { return r.a.Stats().Retries >= 3 })
			elapsed := time.Since(held)
			st := r.a.Stats()
			if st.ConfirmedLSN != 0x2000 || st.PendingKeys != 1 {
				t.Fatalf("while held: confirmed %s, pending %d; want 0/2000, 1", st.ConfirmedLSN, st.PendingKeys)
			}
			if f.count("SELECT count(*) FROM users WHERE id <= 4 AND first_name IS NULL") != 0 {
				t.Error("rows 1-4 not applied")
			}
			// Backing off: about one flush per interval, no spinning.
			if limit := uint64(elapsed/cfg.FlushInterval) + 5; st.Flushes > limit {
				t.Errorf("%d flushes in %s, want at most %d", st.Flushes, elapsed, limit)
			}
			if r.a.ConfirmedLSN() != 0x2000 {
				t.Fatalf("confirmed moved to %s while the key is held", r.a.ConfirmedLSN())
			}
			if st.LockedFlushes < st.Retries {
				t.Errorf("%d retries of a held key but %d statements locked ahead: the held row was not passed over", st.Retries, st.LockedFlushes)
			}

			execOn(t, locker, "UPDATE users SET full_name = 'Alan Turing' WHERE id = 5")
			execOn(t, locker, "COMMIT")
			r.waitApplied(0x2100)
			if n := f.outOfParity(); n != 5 { // rows 6-10 were never sent
				t.Errorf("%d rows out of parity, want 6-10 only", n)
			}
			if got := f.count("SELECT count(*) FROM users WHERE id = 5 AND first_name = 'Alan' AND last_name = 'Turing'"); got != 1 {
				t.Error("row 5 not recomputed from the row its holder committed")
			}
			if st := r.a.Stats(); st.Corrections != 5 || st.PendingKeys != 0 {
				t.Errorf("after release: %+v", st)
			}
		})
	}
}

func TestLargeTransactionFlushesMidway(t *testing.T) {
	const rows, batch = 200_000, 5000
	f := newUsers(t, rows)
	cfg := testConfig(t)
	cfg.MaxBatchKeys = batch
	cfg.FlushInterval = time.Second // flushes come from the size, not the clock
	r := f.start(cfg, 0x100)

	var maxPending atomic.Int64
	sampling := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			if n := int64(r.a.Stats().PendingKeys); n > maxPending.Load() {
				maxPending.Store(n)
			}
			select {
			case <-sampling:
				return
			case <-time.After(time.Millisecond):
			}
		}
	})

	const final, end = pglogrepl.LSN(0x10_0000), pglogrepl.LSN(0x10_0100)
	begin := time.Now()
	r.send(cdc.Event{Kind: cdc.Begin, FinalLSN: final, CommitTime: begin})
	for id := 1; id <= rows; id++ {
		r.send(change(final, strconv.Itoa(id)))
		if id%20_000 == 0 {
			if got := r.a.ConfirmedLSN(); got > final {
				t.Fatalf("confirmed %s past the commit %s of the transaction in flight", got, final)
			}
		}
	}
	waitFor(t, "flushes mid-transaction", func() bool { return r.a.Stats().Flushes >= rows/batch-1 })
	if got := r.a.ConfirmedLSN(); got != final {
		t.Errorf("before Commit: confirmed %s, want %s", got, final)
	}
	r.send(cdc.Event{Kind: cdc.Commit, CommitLSN: final, EndLSN: end, CommitTime: begin})
	r.waitApplied(end)
	t.Logf("%d keys applied in %s", rows, time.Since(begin))
	close(sampling)
	wg.Wait()

	if n := f.outOfParity(); n != 0 {
		t.Errorf("%d rows out of parity", n)
	}
	st := r.a.Stats()
	if st.Corrections != rows || st.Flushes < rows/batch {
		t.Errorf("stats %+v, want %d corrections in at least %d flushes", st, rows, rows/batch)
	}
	if m := maxPending.Load(); m > batch || m == 0 {
		t.Errorf("buffer held up to %d keys, want at most %d", m, batch)
	}
}

func TestCompositeKeyInRelationOrder(t *testing.T) {
	f := newFixture(t, "kv", splitName,
		`CREATE TABLE kv (k2 text, full_name text, k1 int, first_name text, last_name text, PRIMARY KEY (k1, k2))`,
		`INSERT INTO kv (k2, k1, full_name) VALUES ('a', 1, 'Ada Lovelace'), ('b', 1, 'Alan Turing'),
			('a b,"c''d', 2, 'Grace Hopper'), ('a', 3, 'Not Sent')`)
	r := f.start(testConfig(t), 0x100)

	cols := []string{"k2", "k1"} // relation order, not the key's (k1, k2)
	ch := func(k2, k1 string) cdc.Event {
		return cdc.Event{Kind: cdc.Change, FinalLSN: 0x1000, Relation: "public.kv", KeyColumns: cols, Key: []string{k2, k1}}
	}
	r.send(cdc.Event{Kind: cdc.Begin, FinalLSN: 0x1000},
		ch("a", "1"), ch("b", "1"), ch(`a b,"c'd`, "2"), ch("missing", "9"),
		cdc.Event{Kind: cdc.Commit, CommitLSN: 0x1000, EndLSN: 0x1100})
	r.waitApplied(0x1100)

	if n := f.outOfParity(); n != 1 {
		t.Errorf("%d rows out of parity, want 1 (the row not sent)", n)
	}
	if st := r.a.Stats(); st.Corrections != 3 {
		t.Errorf("Corrections = %d, want 3", st.Corrections)
	}
}

func TestReapplyingWritesNothing(t *testing.T) {
	f := newUsers(t, 100)
	f.exec(`UPDATE users SET first_name = split_part(full_name, ' ', 1), last_name = split_part(full_name, ' ', 2)`)
	f.exec(`UPDATE users SET full_name = 'Ada' WHERE id <= 10`)
	f.exec(`UPDATE users SET first_name = 'Ada', last_name = '' WHERE id <= 10`) // in parity again
	if n := f.outOfParity(); n != 0 {
		t.Fatalf("%d rows out of parity before", n)
	}
	// Any write or row lock would change a row's version or xmax.
	versions := func() string {
		var s string
		err := f.db.QueryRow(context.Background(),
			`SELECT string_agg(format('%s %s %s', ctid, xmin, xmax), ',' ORDER BY id) FROM users`).Scan(&s)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	before := versions()

	r := f.start(testConfig(t), 0x100)
	var ids []int
	for i := 1; i <= 100; i++ {
		ids = append(ids, i)
	}
	r.send(txn(0x1000, 0x1100, ids...)...)
	r.waitApplied(0x1100)
	if err := r.close(); err != nil {
		t.Fatal(err)
	}

	if st := r.a.Stats(); st.Corrections != 0 || st.Flushes == 0 {
		t.Errorf("stats %+v, want no corrections after a flush", st)
	}
	if after := versions(); after != before {
		t.Error("re-applying keys in parity wrote or locked rows")
	}
}

func TestExpressionErrorStopsRun(t *testing.T) {
	f := newFixture(t, "users", []recompute.Column{
		{Name: "first_name", Expr: "split_part(full_name, ' ', 1)"},
		{Name: "last_name", Expr: "(10 / (length(full_name) - 5))::text"}, // fails on a 5-letter name
	}, usersDDL, `INSERT INTO users (id, full_name) VALUES (1, 'Ada Lovelace'), (2, 'Grace')`)
	r := f.start(testConfig(t), 0x100)
	r.send(txn(0x1000, 0x1100, 1, 2)...)

	var err error
	select {
	case err = <-r.done:
		r.done <- nil // checked here, not by the cleanup
	case <-time.After(waitTimeout):
		t.Fatal("Run did not stop on a failing expression")
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "22012" || !strings.Contains(err.Error(), "apply keys") ||
		!strings.Contains(err.Error(), "batch of 2 keys") {
		t.Fatalf("Run: %v, want apply keys ... division by zero (22012)", err)
	}
	if got := r.a.ConfirmedLSN(); got != 0x1000 {
		t.Errorf("confirmed %s after the failure, want 0/1000 (the transaction replays)", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := r.a.WaitApplied(ctx, 0x1100); !errors.Is(err, applier.ErrStopped) {
		t.Errorf("WaitApplied after Run returned: %v, want ErrStopped", err)
	}
}

// TestStreamKeepsParity is the user's story for the sync phase: the
// application updates, inserts and deletes users from four connections while
// the stream feeds the applier; once the slot is confirmed past the last
// write, every row is in parity.
func TestStreamKeepsParity(t *testing.T) {
	for _, origin := range []bool{true, false} {
		t.Run(fmt.Sprintf("origin=%v", origin), func(t *testing.T) {
			const seed = 2000
			f := newUsers(t, seed)
			f.exec(`UPDATE users SET first_name = split_part(full_name, ' ', 1), last_name = split_part(full_name, ' ', 2)`)
			// Slot and origin names are the server's, not the database's.
			suffix := strconv.FormatUint(rand.Uint64(), 36)
			slot, originName := "cdcb_"+suffix, "cdcbackfill_applier_"+suffix
			f.exec(`CREATE PUBLICATION cdcb_pub FOR TABLE users`)
			start := f.lsn(`SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
			conn := connect(t, f.dsn)
			if origin {
				// The daemon's own writes carry its origin and the stream skips them.
				f.exec("SELECT pg_replication_origin_create($1)", originName)
				execOn(t, conn, "SELECT pg_replication_origin_session_setup($1)", originName)
				t.Cleanup(func() {
					execOn(t, conn, "SELECT pg_replication_origin_session_reset()")
					f.exec("SELECT pg_replication_origin_drop($1)", originName)
				})
			}
			cfg := testConfig(t)
			a := applier.New(conn, f.table, cfg)
			a.SetConfirmed(start)
			stream := cdc.New(cdc.Config{
				DSN: f.dsn, Slot: slot, Publication: "cdcb_pub", OriginPrefix: "cdcbackfill_",
				StandbyInterval: 100 * time.Millisecond, Logger: cfg.Logger,
			})
			// A context each, stopped in the documented order.
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			sctx, scancel := context.WithCancel(context.Background())
			defer scancel()
			events := make(chan cdc.Event, 1024)
			var streamWG, applyWG sync.WaitGroup
			var streamErr, applyErr error
			streamWG.Go(func() { streamErr = stream.Run(sctx, events, a.ConfirmedLSN) })
			applyWG.Go(func() { applyErr = a.Run(ctx, events) })

			// The application: four writers for a few seconds. A statement is
			// never cancelled: one cut off by its client may still commit after
			// the writers have stopped.
			var writes, failures, slowest atomic.Int64
			stopAt := time.Now().Add(3 * time.Second)
			var writers sync.WaitGroup
			for w := range 4 {
				wc := connect(t, f.dsn)
				writers.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(w), 42))
					next := seed + 1_000_000*(w+1)
					for time.Now().Before(stopAt) {
						began := time.Now()
						var err error
						switch p := rng.IntN(100); {
						case p < 80:
							name := fmt.Sprintf("F%d L%d", rng.IntN(1000), rng.IntN(1000))
							if p < 8 {
								name = fmt.Sprintf("Mononym%d", rng.IntN(1000))
							}
							_, err = wc.Exec(ctx, "UPDATE users SET full_name = $1 WHERE id = $2", name, 1+rng.IntN(seed))
						case p < 95:
							next++
							_, err = wc.Exec(ctx, "INSERT INTO users (id, full_name) VALUES ($1, $2)", next, fmt.Sprintf("New%d Row%d", w, next))
						default:
							_, err = wc.Exec(ctx, "DELETE FROM users WHERE id = $1", 1+rng.IntN(seed))
						}
						if err != nil {
							failures.Add(1)
							t.Errorf("writer %d: %v", w, err)
						}
						writes.Add(1)
						for took := time.Since(began); ; {
							if old := slowest.Load(); int64(took) <= old || slowest.CompareAndSwap(old, int64(took)) {
								break
							}
						}
					}
				})
			}
			writers.Wait()
			if failures.Load() != 0 {
				t.Fatalf("%d application writes failed", failures.Load())
			}
			// The insert position: with synchronous_commit off a commit
			// record may not be written yet when its statement returns.
			end := f.lsn("SELECT pg_current_wal_insert_lsn()::text")
			waitFor(t, "slot confirmed past the last write", func() bool {
				return f.lsn("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot) >= end
			})
			if n := f.outOfParity(); n != 0 {
				t.Errorf("%d rows out of parity", n)
			}
			st := a.Stats()
			t.Logf("%d writes, slowest %s; applier %+v", writes.Load(), time.Duration(slowest.Load()), st)
			if st.Corrections == 0 || st.ConfirmedLSN < end {
				t.Errorf("stats %+v, want corrections and confirmed >= %s", st, end)
			}
			cancel()
			applyWG.Wait()
			final := a.ConfirmedLSN()
			scancel()
			streamWG.Wait()
			if streamErr != nil || applyErr != nil {
				t.Errorf("stream: %v; applier: %v", streamErr, applyErr)
			}
			// The stream's last status carried the applier's final position
			// (the walsender applies it shortly after the stream returns).
			waitFor(t, "slot confirmed at the applier's final "+final.String(), func() bool {
				return f.lsn("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot) == final
			})
		})
	}
}

func TestStillRunning(t *testing.T) {
	const epoch = uint64(1) << 32
	for _, tc := range []struct {
		name string
		snap string
		xids []uint32
		want []uint32
	}{
		{"none running", "100:100:", []uint32{50, 99}, nil},
		{"listed in xip", "90:100:90,95", []uint32{89, 90, 94, 95, 99}, []uint32{90, 95}},
		{"at or after xmax: not listed but running", "100:100:", []uint32{100, 101, 5000}, []uint32{100, 101, 5000}},
		{"xip and xmax with an epoch", fmt.Sprint(epoch+3, ":", epoch+10, ":", epoch+3, ",", epoch+7),
			[]uint32{2, 3, 5, 7, 9, 10, 11}, []uint32{3, 7, 10, 11}},
		{"xids across the wraparound", fmt.Sprint(epoch-10, ":", epoch+5, ":", epoch-4),
			[]uint32{4294967286, 4294967292, 4294967295, 4, 5, 6}, []uint32{4294967292, 5, 6}},
	} {
		got, err := applier.StillRunning(tc.snap, tc.xids)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: stillRunning(%q, %v) = %v, want %v", tc.name, tc.snap, tc.xids, got, tc.want)
		}
	}
	for _, bad := range []string{"", "1:2", "1:x:", "1:2:3,y"} {
		if _, err := applier.StillRunning(bad, []uint32{1}); err == nil {
			t.Errorf("stillRunning(%q) did not fail", bad)
		}
	}
}

// openTxn starts a transaction on a connection of its own that has an xid and
// keeps it open; it returns the connection and the xid's low 32 bits, the
// xid the stream reports.
func openTxn(t *testing.T, dsn string) (*pgx.Conn, uint32) {
	t.Helper()
	conn := connect(t, dsn)
	execOn(t, conn, "BEGIN")
	var txid int64
	if err := conn.QueryRow(context.Background(), "SELECT txid_current()").Scan(&txid); err != nil {
		t.Fatal(err)
	}
	return conn, uint32(txid)
}

// TestWaitVisibleBlocksWhileRunning stands in for the window in which a
// transaction is committed in WAL (and sent by the walsender) but still in
// the proc array: to a snapshot an open transaction looks the same.
func TestWaitVisibleBlocksWhileRunning(t *testing.T) {
	f := newUsers(t, 1)
	a := applier.New(connect(t, f.dsn), f.table, testConfig(t))
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()

	var finishedXid int64 // of a transaction of its own, ended when the statement returns
	if err := f.db.QueryRow(ctx, "SELECT txid_current()").Scan(&finishedXid); err != nil {
		t.Fatal(err)
	}

	// Nothing running: returns at once.
	began := time.Now()
	if waited, err := a.WaitVisible(ctx, []uint32{uint32(finishedXid)}); err != nil || waited {
		t.Fatalf("WaitVisible(ended xid) = %v, %v; want false, nil", waited, err)
	}
	t.Logf("no wait took %s", time.Since(began))

	holder, xid := openTxn(t, f.dsn)
	type result struct {
		waited bool
		err    error
	}
	done := make(chan result, 1)
	go func() {
		waited, err := a.WaitVisible(ctx, []uint32{uint32(finishedXid), xid})
		done <- result{waited, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("WaitVisible returned %+v while transaction %d is open", r, xid)
	case <-time.After(300 * time.Millisecond):
	}
	if st := a.Stats(); st.VisibilityWaits != 1 {
		t.Errorf("VisibilityWaits = %d while waiting, want 1", st.VisibilityWaits)
	}
	committed := time.Now()
	execOn(t, holder, "COMMIT")
	select {
	case r := <-done:
		if r.err != nil || !r.waited {
			t.Fatalf("WaitVisible = %+v, want waited and no error", r)
		}
		t.Logf("returned %s after the commit", time.Since(committed))
	case <-time.After(waitTimeout):
		t.Fatal("WaitVisible did not return after the commit")
	}

	// A cancelled context ends the wait.
	holder, xid = openTxn(t, f.dsn)
	cctx, ccancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer ccancel()
	if _, err := a.WaitVisible(cctx, []uint32{xid}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitVisible with an ending context = %v, want deadline exceeded", err)
	}
	execOn(t, holder, "ROLLBACK")
}

// TestWaitsForTransactionToBeVisible is the bug the wait fixes, end to end:
// a row inserted by a transaction the stream has sent but no snapshot sees
// yet would be found missing, counted as applied, and confirmed past.
func TestWaitsForTransactionToBeVisible(t *testing.T) {
	f := newUsers(t, 10)
	f.exec(`UPDATE users SET first_name = split_part(full_name, ' ', 1), last_name = split_part(full_name, ' ', 2)`)
	// Not yet visible: an insert (missing to the recompute's snapshot) and
	// an update of a row in parity (its old version is in parity).
	writer, xid := openTxn(t, f.dsn)
	execOn(t, writer, "INSERT INTO users (id, full_name) VALUES (11, 'Ada Lovelace')")
	execOn(t, writer, "UPDATE users SET full_name = 'Grace Hopper' WHERE id = 3")

	cfg := testConfig(t)
	r := f.start(cfg, 0x100)
	evs := txn(0x1000, 0x1100, 11, 3)
	for i := range evs {
		evs[i].Xid = xid
	}
	r.send(evs...)
	time.Sleep(10 * cfg.FlushInterval)
	if got := r.a.ConfirmedLSN(); got >= 0x1100 {
		t.Fatalf("confirmed %s past a transaction no snapshot sees", got)
	}
	if st := r.a.Stats(); st.VisibilityWaits != 1 || st.Flushes != 0 || st.PendingKeys != 2 {
		t.Errorf("while waiting: %+v; want one visibility wait, no flush, 2 keys pending", st)
	}

	execOn(t, writer, "COMMIT")
	r.waitApplied(0x1100)
	if n := f.outOfParity(); n != 0 {
		t.Errorf("%d rows out of parity", n)
	}
	if st := r.a.Stats(); st.Corrections != 2 || st.VisibilityWaits != 1 {
		t.Errorf("after the commit: %+v; want 2 corrections, 1 visibility wait", st)
	}

	// Visible transactions cost one snapshot and no wait.
	evs = txn(0x2000, 0x2100, 4)
	for i := range evs {
		evs[i].Xid = xid
	}
	r.send(evs...)
	r.waitApplied(0x2100)
	if st := r.a.Stats(); st.VisibilityWaits != 1 {
		t.Errorf("VisibilityWaits = %d after a visible transaction, want still 1", st.VisibilityWaits)
	}
	if err := r.close(); err != nil {
		t.Fatal(err)
	}
}

func TestForeignRelationStopsRun(t *testing.T) {
	f := newUsers(t, 10)
	r := f.start(testConfig(t), 0x100)
	r.send(txn(0x1000, 0x1100, 1, 2)...)
	r.waitApplied(0x1100)

	// A change of a table the publication should not hold, in a transaction
	// that also changed users.
	foreign := txn(0x1200, 0x1300, 3)
	foreign = append(foreign[:2], cdc.Event{Kind: cdc.Change, FinalLSN: 0x1200, Relation: "public.other",
		KeyColumns: []string{"x"}, Key: []string{"1"}}, foreign[2])
	for _, ev := range foreign {
		select {
		case r.events <- ev:
		case <-time.After(waitTimeout):
			t.Fatal("applier does not read its input")
		}
	}
	var err error
	select {
	case err = <-r.done:
		r.done <- nil // checked here, not by the cleanup
	case <-time.After(waitTimeout):
		t.Fatal("Run did not stop on a change of another table")
	}
	if !errors.Is(err, applier.ErrForeignRelation) || !strings.Contains(err.Error(), "public.other") ||
		!strings.Contains(err.Error(), "not the migrated table public.users") ||
		!strings.Contains(err.Error(), "publication was changed") {
		t.Fatalf("Run = %v, want ErrForeignRelation naming public.other and public.users", err)
	}
	t.Logf("Run = %v", err)
	// At most the transaction's commit LSN: the server sends it again.
	if got := r.a.ConfirmedLSN(); got > 0x1200 {
		t.Errorf("confirmed %s, past the start of the transaction with the foreign change", got)
	}
	if n := f.count("SELECT count(*) FROM users WHERE id = 3 AND first_name IS NOT NULL"); n != 0 {
		t.Error("row 3 of the stopped transaction was applied")
	}
}

// TestStopAppliesBufferedKeys: a SIGTERM finishes the batch in hand. Keys
// the flush interval has not come for yet are applied before Run returns,
// and ConfirmedLSN covers them.
func TestStopAppliesBufferedKeys(t *testing.T) {
	f := newUsers(t, 100)
	cfg := testConfig(t)
	cfg.FlushInterval = time.Hour // only the stop flushes
	r := f.start(cfg, 0x100)
	var ids []int
	for i := 1; i <= 50; i++ {
		ids = append(ids, i)
	}
	evs := txn(0x1000, 0x1100, ids...)
	r.send(evs...)
	waitFor(t, "the events to be read", func() bool { return r.a.Stats().Events == uint64(len(evs)) })
	if st := r.a.Stats(); st.PendingKeys != 50 || st.ConfirmedLSN != 0x1000 {
		t.Fatalf("before the stop: %+v, want 50 keys pending, confirmed 0/1000", st)
	}

	began := time.Now()
	if err := r.stop(); err != nil {
		t.Fatalf("Run after cancel: %v", err)
	}
	t.Logf("stopped in %s", time.Since(began))
	if got := r.a.ConfirmedLSN(); got != 0x1100 {
		t.Errorf("confirmed %s after the stop, want 0/1100", got)
	}
	if n := f.count("SELECT count(*) FROM users WHERE id <= 50 AND first_name IS NULL"); n != 0 {
		t.Errorf("%d buffered rows not applied by the stop", n)
	}
	if n := f.outOfParity(); n != 50 {
		t.Errorf("%d rows out of parity, want 50 (those never sent)", n)
	}
}

// TestStopFinishesStatementInHand: a stop during a flush lets that flush
// finish (here it waits for a transaction to become visible) within
// StopTimeout; past StopTimeout Run gives up, returns nil and confirms
// nothing it did not apply.
func TestStopFinishesStatementInHand(t *testing.T) {
	for _, finishes := range []bool{true, false} {
		t.Run(fmt.Sprintf("finishes=%v", finishes), func(t *testing.T) {
			f := newUsers(t, 10)
			writer, xid := openTxn(t, f.dsn)
			execOn(t, writer, "INSERT INTO users (id, full_name) VALUES (11, 'Ada Lovelace')")
			cfg := testConfig(t)
			cfg.StopTimeout = 2 * time.Second
			r := f.start(cfg, 0x100)
			evs := txn(0x1000, 0x1100, 11, 2)
			for i := range evs {
				evs[i].Xid = xid
			}
			r.send(evs...)
			waitFor(t, "the flush to wait for the transaction", func() bool { return r.a.Stats().VisibilityWaits == 1 })

			began := time.Now()
			r.cancel()
			select {
			case err := <-r.done:
				r.done <- err
				t.Fatalf("Run returned %v at the stop, with the flush in hand", err)
			case <-time.After(300 * time.Millisecond):
			}
			if finishes {
				execOn(t, writer, "COMMIT")
			}
			err := r.stop()
			took := time.Since(began)
			t.Logf("Run returned %v %s after the cancel", err, took)
			if err != nil {
				t.Fatalf("Run after cancel: %v", err)
			}
			got := r.a.ConfirmedLSN()
			if finishes {
				if got != 0x1100 || f.outOfParity() != 9 { // 11 rows, 2 applied
					t.Errorf("confirmed %s, %d rows out of parity; want 0/1100 and rows 11, 2 applied", got, f.outOfParity())
				}
				return
			}
			if took < cfg.StopTimeout || took > cfg.StopTimeout+5*time.Second {
				t.Errorf("Run returned %s after the cancel, want about StopTimeout %s", took, cfg.StopTimeout)
			}
			if got != 0x1000 {
				t.Errorf("confirmed %s after a stop that applied nothing, want 0/1000", got)
			}
			execOn(t, writer, "ROLLBACK")
		})
	}
}

// TestIdleConfirmsPastUnpublishedWrites is what verify and contract wait
// for: with the application idle, a write to a table outside the
// publication (the stream sends nothing for it) is confirmed past within a
// few seconds, with the stream's default standby interval.
func TestIdleConfirmsPastUnpublishedWrites(t *testing.T) {
	f := newUsers(t, 10)
	f.exec("CREATE TABLE other (id bigint)")
	slot := "cdcb_" + strconv.FormatUint(rand.Uint64(), 36)
	f.exec(`CREATE PUBLICATION cdcb_pub FOR TABLE users`)
	start := f.lsn(`SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
	cfg := testConfig(t)
	a := applier.New(connect(t, f.dsn), f.table, cfg)
	a.SetConfirmed(start)
	stream := cdc.New(cdc.Config{DSN: f.dsn, Slot: slot, Publication: "cdcb_pub", Logger: cfg.Logger})
	actx, acancel := context.WithCancel(context.Background())
	defer acancel()
	sctx, scancel := context.WithCancel(context.Background())
	defer scancel()
	events := make(chan cdc.Event, 1024)
	streamErr, applyErr := make(chan error, 1), make(chan error, 1)
	go func() { streamErr <- stream.Run(sctx, events, a.ConfirmedLSN) }()
	go func() { applyErr <- a.Run(actx, events) }()
	waitFor(t, "the stream to start", func() bool { return stream.Stats().Keepalives > 0 })
	time.Sleep(time.Second)

	for i := range 3 {
		f.exec("INSERT INTO other VALUES ($1)", i)
		target := f.lsn("SELECT pg_current_wal_insert_lsn()::text")
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		began := time.Now()
		err := a.WaitApplied(ctx, target)
		cancel()
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		t.Logf("write %d: confirmed passed %s after %s", i, target, time.Since(began))
		time.Sleep(time.Duration(i) * 700 * time.Millisecond)
	}
	if st := stream.Stats(); st.Events == 0 || st.Transactions != 0 {
		t.Errorf("stream stats %+v: want Idle events only", st)
	}

	acancel()
	if err := <-applyErr; err != nil {
		t.Errorf("applier: %v", err)
	}
	scancel()
	if err := <-streamErr; err != nil {
		t.Errorf("stream: %v", err)
	}
}

// TestDeferredCorrection: in the deferred mode a changed key waits, and
// the confirmed position stays at its transaction, so the slot keeps the
// WAL to replay it; repeated changes of a key are one correction; Hurry
// corrects them all, a paced statement per 1000 keys; a full buffer is
// corrected without one.
func TestDeferredCorrection(t *testing.T) {
	f := newUsers(t, 3000) // every row out of parity
	cfg := testConfig(t)
	cfg.Defer = time.Hour
	cfg.MaxDeferredKeys = 2500
	var mu sync.Mutex
	var paced []int
	cfg.Pace = func(ctx context.Context, keys int) error {
		mu.Lock()
		defer mu.Unlock()
		paced = append(paced, keys)
		return nil
	}
	r := f.start(cfg, 0x100)
	var up, down []int
	for i := 1; i <= 2000; i++ {
		up, down = append(up, i), append(down, 2001-i)
	}
	evs := slices.Concat(txn(0x1000, 0x1100, down...), txn(0x2000, 0x2100, up...), txn(0x3000, 0x3100, down...))
	r.send(evs...)
	waitFor(t, "the events to be read", func() bool { return r.a.Stats().Events == uint64(len(evs)) })
	st := r.a.Stats()
	if !st.Deferring || st.PendingKeys != 2000 || st.ConfirmedLSN != 0x1000 || st.Corrections != 0 {
		t.Fatalf("while deferring: %+v; want 2000 keys pending, confirmed at the first transaction 0/1000, no correction", st)
	}
	if n := f.outOfParity(); n != 3000 {
		t.Fatalf("%d rows out of parity while deferring, want all 3000", n)
	}

	r.a.Hurry()
	r.waitApplied(0x3100)
	if n := f.outOfParity(); n != 1000 {
		t.Errorf("%d rows out of parity after Hurry, want the 1000 never changed", n)
	}
	st = r.a.Stats()
	if st.Corrections != 2000 || st.Flushes != 1 {
		t.Errorf("after Hurry: %d corrections in %d flushes, want 2000 in 1", st.Corrections, st.Flushes)
	}
	mu.Lock()
	if !slices.Equal(paced, []int{1000, 1000}) {
		t.Errorf("paced statements %v, want [1000 1000]", paced)
	}
	mu.Unlock()

	// 1000 keys wait; 1500 more fill the buffer (2500): corrected at once.
	var rest, first []int
	for i := 2001; i <= 3000; i++ {
		rest = append(rest, i)
	}
	for i := 1; i <= 1500; i++ {
		first = append(first, i)
	}
	f.exec(`UPDATE users SET full_name = 'Renamed ' || id WHERE id <= 1500`)
	r.send(txn(0x4000, 0x4100, rest...)...)
	r.send(txn(0x5000, 0x5100, first...)...)
	r.waitApplied(0x5100)
	if n := f.outOfParity(); n != 0 {
		t.Errorf("%d rows out of parity after the buffer filled, want 0", n)
	}
}
