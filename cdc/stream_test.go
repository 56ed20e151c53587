package cdc_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/cdcbackfill/cdcbackfill/cdc"
	"github.com/cdcbackfill/cdcbackfill/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// eventTimeout bounds every wait for an event; events normally arrive in
// milliseconds, so only a bug reaches it.
const eventTimeout = 20 * time.Second

// fixture is a fresh database with table t published by a pgoutput slot.
type fixture struct {
	t    *testing.T
	dsn  string
	db   *pgx.Conn
	slot string
	pub  string
}

func newFixture(t *testing.T, tableDDL ...string) *fixture {
	t.Helper()
	if len(tableDDL) == 0 {
		tableDDL = []string{"CREATE TABLE t (id bigint PRIMARY KEY, a text, b text)"}
	}
	f := &fixture{t: t, dsn: pgtest.NewDatabase(t), slot: "cdc_" + randHex(6), pub: "pub_t"}
	f.db = connect(t, f.dsn)
	for _, ddl := range tableDDL {
		f.exec(ddl)
	}
	f.exec("CREATE PUBLICATION " + pgx.Identifier{f.pub}.Sanitize() + " FOR TABLE t")
	f.exec("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", f.slot)
	return f
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
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

func (f *fixture) confirmedFlush() pglogrepl.LSN {
	return f.lsn("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", f.slot)
}

func (f *fixture) config() cdc.Config {
	return cdc.Config{
		DSN:             f.dsn,
		Slot:            f.slot,
		Publication:     f.pub,
		OriginPrefix:    "cdcbackfill_",
		StandbyInterval: 100 * time.Millisecond,
		ReconnectMin:    20 * time.Millisecond,
		ReconnectMax:    500 * time.Millisecond,
		Logger:          slog.New(slog.NewTextHandler(testWriter{f.t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// consumer runs a Stream the way the applier does: it reads events and says
// what is confirmed.
type consumer struct {
	t         *testing.T
	stream    *cdc.Stream
	events    chan cdc.Event
	done      chan error
	cancel    context.CancelFunc
	confirmed atomic.Uint64
	stopped   bool
}

func (f *fixture) start(cfg cdc.Config) *consumer {
	f.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := &consumer{
		t:      f.t,
		stream: cdc.New(cfg),
		events: make(chan cdc.Event, 16),
		done:   make(chan error, 1),
		cancel: cancel,
	}
	go func() {
		c.done <- c.stream.Run(ctx, c.events, func() pglogrepl.LSN { return pglogrepl.LSN(c.confirmed.Load()) })
	}()
	f.t.Cleanup(func() {
		if err := c.stop(); err != nil {
			f.t.Errorf("Run: %v", err)
		}
	})
	return c
}

// stop ends Run and returns its error.
func (c *consumer) stop() error {
	if c.stopped {
		return nil
	}
	c.stopped = true
	c.cancel()
	select {
	case err := <-c.done:
		return err
	case <-time.After(eventTimeout):
		return errors.New("Run did not return after cancel")
	}
}

// next returns the next event, failing the test if none comes in time.
func (c *consumer) next() cdc.Event {
	c.t.Helper()
	select {
	case ev := <-c.events:
		return ev
	case err := <-c.done:
		c.stopped = true
		c.t.Fatalf("Run returned early: %v", err)
	case <-time.After(eventTimeout):
		c.t.Fatalf("no event within %s", eventTimeout)
	}
	panic("unreachable")
}

// txn returns the events of the next transaction, Begin to Commit,
// skipping Idle events before it.
func (c *consumer) txn() []cdc.Event {
	c.t.Helper()
	ev := c.next()
	for ev.Kind == cdc.Idle {
		ev = c.next()
	}
	if ev.Kind != cdc.Begin {
		c.t.Fatalf("got %v, want Begin", ev)
	}
	evs := []cdc.Event{ev}
	for ev.Kind != cdc.Commit {
		ev = c.next()
		if ev.Kind != cdc.Change && ev.Kind != cdc.Commit {
			c.t.Fatalf("got %v inside a transaction", ev)
		}
		evs = append(evs, ev)
	}
	return evs
}

// until reads events until one satisfies ok and returns it.
func (c *consumer) until(what string, ok func(cdc.Event) bool) cdc.Event {
	c.t.Helper()
	deadline := time.Now().Add(eventTimeout)
	for time.Now().Before(deadline) {
		if ev := c.next(); ok(ev) {
			return ev
		}
	}
	c.t.Fatalf("no %s within %s", what, eventTimeout)
	panic("unreachable")
}

// keysOf returns the keys of the Change events, joined by commas.
func keysOf(evs []cdc.Event) []string {
	var keys []string
	for _, ev := range evs {
		if ev.Kind == cdc.Change {
			keys = append(keys, strings.Join(ev.Key, ","))
		}
	}
	return keys
}

// checkTxn checks the shape every transaction has and returns its Commit.
func checkTxn(t *testing.T, evs []cdc.Event) cdc.Event {
	t.Helper()
	begin, commit := evs[0], evs[len(evs)-1]
	if begin.FinalLSN != commit.CommitLSN {
		t.Errorf("Begin.FinalLSN %s != Commit.CommitLSN %s", begin.FinalLSN, commit.CommitLSN)
	}
	if commit.EndLSN <= commit.CommitLSN {
		t.Errorf("Commit.EndLSN %s <= CommitLSN %s", commit.EndLSN, commit.CommitLSN)
	}
	if begin.CommitTime.IsZero() || !begin.CommitTime.Equal(commit.CommitTime) {
		t.Errorf("commit times: Begin %v, Commit %v", begin.CommitTime, commit.CommitTime)
	}
	for _, ev := range evs[1 : len(evs)-1] {
		if ev.FinalLSN != begin.FinalLSN {
			t.Errorf("Change.FinalLSN %s != Begin.FinalLSN %s", ev.FinalLSN, begin.FinalLSN)
		}
	}
	return commit
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(eventTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestInsertUpdateDelete(t *testing.T) {
	f := newFixture(t)
	c := f.start(f.config())

	type want struct {
		keys    []string
		deletes int
	}
	steps := []struct {
		name string
		sql  []string
		want want
	}{
		{"insert three rows in one transaction",
			[]string{"INSERT INTO t VALUES (1, 'a1', 'b1'), (2, 'a2', 'b2'), (3, 'a3', 'b3')"},
			want{keys: []string{"1", "2", "3"}}},
		{"update a non-key column",
			[]string{"UPDATE t SET a = 'x' WHERE id = 1"},
			want{keys: []string{"1"}}},
		{"update the key: the new key only",
			[]string{"UPDATE t SET id = 20 WHERE id = 2"},
			want{keys: []string{"20"}}},
		{"delete: no change, counted",
			[]string{"DELETE FROM t WHERE id = 3"},
			want{deletes: 1}},
		{"several statements in one transaction",
			[]string{"BEGIN", "INSERT INTO t VALUES (4, 'a4', 'b4')", "UPDATE t SET b = 'y' WHERE id = 1",
				"DELETE FROM t WHERE id = 20", "INSERT INTO t VALUES (5, NULL, NULL)", "COMMIT"},
			want{keys: []string{"4", "1", "5"}, deletes: 1}},
		{"toasted column left unchanged by the update",
			[]string{"INSERT INTO t SELECT 6, string_agg(md5(i::text), ''), 'b' FROM generate_series(1, 5000) i",
				"UPDATE t SET b = 'z' WHERE id = 6"},
			want{keys: []string{"6"}}}, // the insert's transaction is read separately below
		{"truncate: no change, counted",
			[]string{"TRUNCATE t"},
			want{deletes: 1}},
	}
	var lastCommit pglogrepl.LSN
	for _, step := range steps {
		for _, sql := range step.sql {
			f.exec(sql)
		}
		evs := c.txn()
		if strings.HasPrefix(step.name, "toasted") {
			evs = c.txn() // the UPDATE's transaction
		}
		commit := checkTxn(t, evs)
		if got := keysOf(evs); !slices.Equal(got, step.want.keys) {
			t.Errorf("%s: keys %q, want %q", step.name, got, step.want.keys)
		}
		if commit.Deletes != step.want.deletes {
			t.Errorf("%s: Deletes %d, want %d", step.name, commit.Deletes, step.want.deletes)
		}
		for _, ev := range evs {
			if ev.Kind == cdc.Change && (ev.Relation != "public.t" || !slices.Equal(ev.KeyColumns, []string{"id"})) {
				t.Errorf("%s: Relation %q KeyColumns %q", step.name, ev.Relation, ev.KeyColumns)
			}
		}
		if commit.CommitLSN <= lastCommit {
			t.Errorf("%s: CommitLSN %s not after the previous %s", step.name, commit.CommitLSN, lastCommit)
		}
		lastCommit = commit.CommitLSN
	}

	// The counters move just after the Commit is handed over.
	waitFor(t, "the last transaction counted", func() bool { return c.stream.Stats().Transactions >= uint64(len(steps)+1) })
	st := c.stream.Stats()
	if st.Transactions != uint64(len(steps)+1) || st.SkippedTransactions != 0 || st.ReceivedLSN < lastCommit ||
		st.LastCommitTime.IsZero() {
		t.Errorf("Stats = %+v", st)
	}
}

// TestEventsCarryXid checks that Begin, every Change (a subtransaction's
// included) and Commit carry the writing transaction's top-level id, the one
// the applier waits on before it trusts a snapshot.
func TestEventsCarryXid(t *testing.T) {
	f := newFixture(t)
	c := f.start(f.config())
	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()

	var prev uint32
	for i, tc := range []struct {
		stmts   []string
		changes int
	}{
		{[]string{"INSERT INTO t VALUES (1, 'a', 'b'), (2, 'a', 'b')", "UPDATE t SET a = 'x' WHERE id = 1"}, 3},
		{[]string{"SAVEPOINT s", "INSERT INTO t VALUES (3, 'a', 'b')", "RELEASE SAVEPOINT s", "UPDATE t SET b = 'y' WHERE id = 2"}, 2},
	} {
		tx, err := f.db.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var txid int64
		if err := tx.QueryRow(ctx, "SELECT txid_current()").Scan(&txid); err != nil {
			t.Fatal(err)
		}
		for _, sql := range tc.stmts {
			if _, err := tx.Exec(ctx, sql); err != nil {
				t.Fatalf("%s: %v", sql, err)
			}
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		want := uint32(txid) // txid_current is the xid with its epoch: the low 32 bits are the xid
		evs := c.txn()
		checkTxn(t, evs)
		if n := len(keysOf(evs)); n != tc.changes {
			t.Errorf("transaction %d: %d changes, want %d", i, n, tc.changes)
		}
		for _, ev := range evs {
			if ev.Xid != want {
				t.Errorf("transaction %d: %v has Xid %d, want %d (txid_current %d)", i, ev.Kind, ev.Xid, want, txid)
			}
		}
		if want == prev {
			t.Errorf("transaction %d has the same xid %d as the one before", i, want)
		}
		prev = want
	}
}

func TestCompositeKeyInColumnOrder(t *testing.T) {
	// The key is declared (k1, k2) but k2 comes first in the table: events
	// follow the column order.
	f := newFixture(t, "CREATE TABLE t (k2 text, v text, k1 int, PRIMARY KEY (k1, k2))")
	c := f.start(f.config())

	f.exec(`INSERT INTO t VALUES ('a b,"c''', 'v', 7), ('', 'w', -1)`)
	evs := c.txn()
	checkTxn(t, evs)
	var got [][]string
	for _, ev := range evs {
		if ev.Kind == cdc.Change {
			if !slices.Equal(ev.KeyColumns, []string{"k2", "k1"}) {
				t.Errorf("KeyColumns %q, want [k2 k1]", ev.KeyColumns)
			}
			got = append(got, ev.Key)
		}
	}
	want := [][]string{{`a b,"c'`, "7"}, {"", "-1"}}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("keys %q, want %q", got, want)
	}
}

func TestSkipsOwnOrigin(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	prefix := "cdcbackfill_" + randHex(4) + "_"
	cfg.OriginPrefix = prefix
	c := f.start(cfg)

	// Origins are cluster-wide: unique names, dropped at the end.
	writeWithOrigin := func(origin, sql string) {
		t.Helper()
		conn := connect(t, f.dsn)
		execOn(t, conn, "SELECT pg_replication_origin_create($1)", origin)
		t.Cleanup(func() {
			if _, err := f.db.Exec(context.Background(), "SELECT pg_replication_origin_drop($1)", origin); err != nil {
				t.Errorf("drop origin %s: %v", origin, err)
			}
		})
		execOn(t, conn, "SELECT pg_replication_origin_session_setup($1)", origin)
		execOn(t, conn, sql)
		execOn(t, conn, "SELECT pg_replication_origin_session_reset()")
	}
	writeWithOrigin(prefix+"w0", "INSERT INTO t VALUES (1, 'daemon')")
	writeWithOrigin("other_"+randHex(4)+"_w0", "INSERT INTO t VALUES (2, 'replicated in')")
	f.exec("INSERT INTO t VALUES (3, 'application')")

	var keys []string
	for range 2 {
		evs := c.txn()
		checkTxn(t, evs)
		keys = append(keys, keysOf(evs)...)
	}
	if !slices.Equal(keys, []string{"2", "3"}) {
		t.Errorf("keys %q, want [2 3]: only the daemon's own transaction is skipped", keys)
	}
	// The counters move just after the Commit is handed over.
	waitFor(t, "both transactions counted", func() bool { return c.stream.Stats().Transactions >= 2 })
	if st := c.stream.Stats(); st.SkippedTransactions != 1 || st.Transactions != 2 {
		t.Errorf("Skipped %d Transactions %d, want 1 and 2", st.SkippedTransactions, st.Transactions)
	}
}

// TestOriginNoneDropsTransactionsServerSide: on PostgreSQL 16+ the
// walsender itself drops every transaction that carries an origin, with no
// prefix skipping in the client; the application's come through.
func TestOriginNoneDropsTransactionsServerSide(t *testing.T) {
	if v := pgtest.Shared(t).Major(); v != 0 && v < 16 {
		t.Skipf("PostgreSQL %d has no origin filter in the walsender", v)
	}
	f := newFixture(t)
	cfg := f.config()
	cfg.OriginPrefix = "" // nothing skipped here: only the server can drop it
	cfg.OriginNone = true
	c := f.start(cfg)
	origin := "cdcbackfill_" + randHex(4) + ".w0"
	conn := connect(t, f.dsn)
	execOn(t, conn, "SELECT pg_replication_origin_create($1)", origin)
	t.Cleanup(func() { _, _ = f.db.Exec(context.Background(), "SELECT pg_replication_origin_drop($1)", origin) })
	execOn(t, conn, "SELECT pg_replication_origin_session_setup($1)", origin)
	execOn(t, conn, "INSERT INTO t VALUES (1, 'daemon')")
	execOn(t, conn, "SELECT pg_replication_origin_session_reset()")
	f.exec("INSERT INTO t VALUES (2, 'application')")
	evs := c.txn()
	checkTxn(t, evs)
	if keys := keysOf(evs); !slices.Equal(keys, []string{"2"}) {
		t.Errorf("keys %q, want [2]: the origin's transaction should not have been sent", keys)
	}
	if st := c.stream.Stats(); st.SkippedTransactions != 0 {
		t.Errorf("%d transactions skipped in the client; the server should have dropped them", st.SkippedTransactions)
	}
}

func TestRelationChangesMidStream(t *testing.T) {
	f := newFixture(t)
	c := f.start(f.config())

	f.exec("INSERT INTO t VALUES (1, 'a')")
	if got := keysOf(c.txn()); !slices.Equal(got, []string{"1"}) {
		t.Fatalf("keys %q", got)
	}

	f.exec("ALTER TABLE t ADD COLUMN c text NOT NULL DEFAULT 'c0'")
	f.exec("INSERT INTO t VALUES (2, 'a', 'b', 'c2')")
	f.exec("UPDATE t SET c = 'c1' WHERE id = 1")
	for _, want := range []string{"2", "1"} {
		if got := keysOf(c.txn()); !slices.Equal(got, []string{want}) {
			t.Fatalf("after ADD COLUMN: keys %q, want [%s]", got, want)
		}
	}

	// A new key moves the flagged columns: the new Relation message must win.
	f.exec("ALTER TABLE t DROP COLUMN a, DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (c, id)")
	f.exec("INSERT INTO t VALUES (3, 'b', 'c3')")
	evs := c.txn()
	checkTxn(t, evs)
	ch := evs[1]
	if !slices.Equal(ch.KeyColumns, []string{"id", "c"}) || !slices.Equal(ch.Key, []string{"3", "c3"}) {
		t.Errorf("after key change: KeyColumns %q Key %q, want [id c] [3 c3]", ch.KeyColumns, ch.Key)
	}
}

func TestLargeTransactionStreams(t *testing.T) {
	f := newFixture(t)
	c := f.start(f.config())
	const rows = 50000
	f.exec("INSERT INTO t SELECT i, 'a' FROM generate_series(1, $1::int) i", rows)

	if ev := c.until("Begin", func(ev cdc.Event) bool { return ev.Kind == cdc.Begin }); ev.FinalLSN == 0 {
		t.Fatalf("Begin without FinalLSN")
	}
	n := 0
	for ev := c.next(); ev.Kind != cdc.Commit; ev = c.next() {
		if ev.Kind != cdc.Change {
			t.Fatalf("got %v", ev.Kind)
		}
		n++
		if want := fmt.Sprint(n); ev.Key[0] != want {
			t.Fatalf("key %q, want %s", ev.Key[0], want)
		}
	}
	if n != rows {
		t.Errorf("%d changes, want %d", n, rows)
	}
}

func TestSlowConsumerKeepsConnection(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	// The walsender drops a client silent for this long.
	cfg.DSN += "&wal_sender_timeout=500"
	c := f.start(cfg)
	c.until("Idle", func(ev cdc.Event) bool { return ev.Kind == cdc.Idle })

	// More rows than the channel holds: the stream blocks on the consumer,
	// which reads nothing until the walsender has heard from the stream well
	// after its timeout.
	const rows = 100
	f.exec("INSERT INTO t SELECT i FROM generate_series(1, $1::int) i", rows)
	blocked := time.Now()
	waitFor(t, "standby status replies during 4 walsender timeouts", func() bool {
		var replied *time.Time
		err := f.db.QueryRow(context.Background(),
			"SELECT reply_time FROM pg_stat_replication WHERE pid = (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1)",
			f.slot).Scan(&replied)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			t.Fatal(err)
		}
		return replied != nil && replied.After(blocked.Add(2*time.Second))
	})
	if len(c.events) != cap(c.events) {
		t.Fatalf("the stream is not blocked: %d of %d events buffered", len(c.events), cap(c.events))
	}

	evs := c.txn()
	if len(keysOf(evs)) != rows {
		t.Errorf("%d changes, want %d", len(keysOf(evs)), rows)
	}
	if st := c.stream.Stats(); st.Reconnects != 0 {
		t.Errorf("Stats.Reconnects = %d: a busy consumer cost the connection", st.Reconnects)
	}
}

func TestConfirmsOnlyWhatConsumerConfirmed(t *testing.T) {
	f := newFixture(t)
	start := f.confirmedFlush()
	c := f.start(f.config())

	f.exec("INSERT INTO t VALUES (1)")
	commit := checkTxn(t, c.txn())
	f.exec("INSERT INTO t VALUES (2)")
	second := checkTxn(t, c.txn())

	// Nothing confirmed yet: the server must still be where it began, while
	// keepalives say everything was sent.
	c.until("Idle past the second commit", func(ev cdc.Event) bool {
		return ev.Kind == cdc.Idle && ev.EndLSN >= second.EndLSN
	})
	if got := f.confirmedFlush(); got != start {
		t.Fatalf("confirmed_flush_lsn %s moved from %s with nothing confirmed", got, start)
	}

	c.confirmed.Store(uint64(commit.EndLSN))
	waitFor(t, "confirmed_flush_lsn to reach the first commit", func() bool { return f.confirmedFlush() >= commit.EndLSN })
	if got := f.confirmedFlush(); got != commit.EndLSN {
		t.Fatalf("confirmed_flush_lsn %s, want exactly %s", got, commit.EndLSN)
	}

	// On shutdown the last confirmed position is sent, without waiting for
	// the next period.
	cfg := f.config()
	cfg.StandbyInterval = time.Hour
	if err := c.stop(); err != nil {
		t.Fatal(err)
	}
	c = f.start(cfg)
	f.exec("INSERT INTO t VALUES (3)")
	var third cdc.Event
	for third.Kind != cdc.Commit {
		evs := c.txn() // transaction 2 comes again first: it was never confirmed
		if commit := checkTxn(t, evs); slices.Equal(keysOf(evs), []string{"3"}) {
			third = commit
		}
	}
	c.confirmed.Store(uint64(third.EndLSN))
	if err := c.stop(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "confirmed_flush_lsn to reach the third commit", func() bool { return f.confirmedFlush() == third.EndLSN })
}

func TestResetAfterWalsenderTerminated(t *testing.T) {
	f := newFixture(t)
	c := f.start(f.config())

	f.exec("INSERT INTO t VALUES (1)")
	first := checkTxn(t, c.txn())
	c.confirmed.Store(uint64(first.EndLSN))
	// Confirmed before the kill, so nothing replays after it.
	waitFor(t, "confirmed_flush_lsn to reach the first commit", func() bool { return f.confirmedFlush() >= first.EndLSN })

	var terminated bool
	waitFor(t, "the walsender to be killed", func() bool {
		err := f.db.QueryRow(context.Background(),
			"SELECT coalesce(bool_or(pg_terminate_backend(active_pid)), false) FROM pg_replication_slots WHERE slot_name = $1",
			f.slot).Scan(&terminated)
		if err != nil {
			t.Fatal(err)
		}
		return terminated
	})
	c.until("Reset", func(ev cdc.Event) bool {
		if ev.Kind == cdc.Change || ev.Kind == cdc.Begin || ev.Kind == cdc.Commit {
			t.Fatalf("got %v before Reset: nothing was left to send", ev)
		}
		return ev.Kind == cdc.Reset
	})

	f.exec("INSERT INTO t VALUES (2)")
	evs := c.txn()
	checkTxn(t, evs)
	if got := keysOf(evs); !slices.Equal(got, []string{"2"}) {
		t.Errorf("keys after reconnect %q, want [2]", got)
	}
	if st := c.stream.Stats(); st.Reconnects == 0 {
		t.Errorf("Stats.Reconnects = 0 after a reconnect")
	}
}

func TestResumesAfterServerRestart(t *testing.T) {
	srv := pgtest.Shared(t)
	if srv.Kind() == "env" {
		t.Skip("server from the environment: cannot restart it")
	}
	f := newFixture(t)
	c := f.start(f.config())

	f.exec("INSERT INTO t VALUES (1)")
	first := checkTxn(t, c.txn())
	c.confirmed.Store(uint64(first.EndLSN))
	waitFor(t, "confirmed_flush_lsn to reach the first commit", func() bool { return f.confirmedFlush() >= first.EndLSN })

	before := srv.DSN()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if srv.DSN() != before {
		t.Skip("the server came back on another address; a Stream keeps its DSN")
	}
	f.db = connect(t, f.dsn)

	c.until("Reset", func(ev cdc.Event) bool { return ev.Kind == cdc.Reset })
	f.exec("INSERT INTO t VALUES (2)")
	// Transaction 1 may replay: a restart can lose an in-memory confirm.
	for {
		evs := c.txn()
		checkTxn(t, evs)
		keys := keysOf(evs)
		if slices.Equal(keys, []string{"2"}) {
			break
		}
		if !slices.Equal(keys, []string{"1"}) {
			t.Fatalf("keys %q after restart, want [1] (replay) or [2]", keys)
		}
	}
}

func TestPermanentErrors(t *testing.T) {
	cases := []struct {
		name    string
		prepare func(f *fixture, cfg *cdc.Config)
		want    error
		text    string
	}{
		{"slot missing",
			func(f *fixture, cfg *cdc.Config) { cfg.Slot = "no_such_slot_" + randHex(4) },
			cdc.ErrSlotMissing, "does not exist"},
		{"publication missing",
			func(f *fixture, cfg *cdc.Config) {
				cfg.Publication = "no_such_pub"
				f.exec("INSERT INTO t VALUES (1)") // pgoutput looks publications up at the first change
			},
			cdc.ErrPublicationMissing, "no_such_pub"},
		{"role without REPLICATION",
			func(f *fixture, cfg *cdc.Config) {
				role := "norepl_" + randHex(4)
				f.exec("CREATE ROLE " + role + " LOGIN")
				f.t.Cleanup(func() { _, _ = f.db.Exec(context.Background(), "DROP ROLE IF EXISTS "+role) })
				var db string
				if err := f.db.QueryRow(context.Background(), "SELECT current_database()").Scan(&db); err != nil {
					f.t.Fatal(err)
				}
				cfg.DSN = pgtest.Shared(f.t).DSNFor(db, role, "")
			},
			cdc.ErrNotAllowed, "REPLICATION"},
		{"slot lost its WAL",
			func(f *fixture, cfg *cdc.Config) {
				if pgtest.Shared(f.t).Kind() == "env" {
					f.t.Skip("would change the configuration of a server from the environment")
				}
				invalidateSlot(f)
			},
			cdc.ErrSlotLost, "fresh backfill"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			cfg := f.config()
			tc.prepare(f, &cfg)
			s := cdc.New(cfg)
			ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
			defer cancel()
			events := make(chan cdc.Event, 1024)
			err := s.Run(ctx, events, func() pglogrepl.LSN { return 0 })
			if ctx.Err() != nil {
				t.Fatalf("Run kept retrying a permanent error (reconnects %d)", s.Stats().Reconnects)
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("Run = %v, want %v mentioning %q", err, tc.want, tc.text)
			}
			t.Logf("Run = %v", err)
		})
	}
}

// invalidateSlot makes the server drop WAL the slot needs, as
// max_slot_wal_keep_size does to a slot left far behind.
func invalidateSlot(f *fixture) {
	f.t.Helper()
	f.exec("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
	f.exec("SELECT pg_reload_conf()")
	f.t.Cleanup(func() {
		_, _ = f.db.Exec(context.Background(), "ALTER SYSTEM RESET max_slot_wal_keep_size")
		_, _ = f.db.Exec(context.Background(), "SELECT pg_reload_conf()")
	})
	waitFor(f.t, "the slot to be lost", func() bool {
		f.exec("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 'x'")
		f.exec("SELECT pg_switch_wal()")
		f.exec("CHECKPOINT")
		var status string
		if err := f.db.QueryRow(context.Background(),
			"SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", f.slot).Scan(&status); err != nil {
			f.t.Fatal(err)
		}
		return status == "lost"
	})
}

// confirmLikeApplier reads c's events until the test ends and confirms what
// an applier with nothing to apply would: each Commit's and Idle's EndLSN.
func (c *consumer) confirmLikeApplier() {
	done := make(chan struct{})
	c.t.Cleanup(func() { close(done) })
	go func() {
		for {
			select {
			case ev := <-c.events:
				if (ev.Kind == cdc.Commit || ev.Kind == cdc.Idle) && uint64(ev.EndLSN) > c.confirmed.Load() {
					c.confirmed.Store(uint64(ev.EndLSN))
				}
			case <-done:
				return
			}
		}
	}()
}

// TestIdleConfirmsPastUnpublishedWrites is how verify and contract wait:
// they read pg_current_wal_insert_lsn() and wait for the consumer to confirm
// past it. With the application idle and the only new WAL from a table
// outside the publication, nothing is sent but keepalives; the periodic
// standby status asks the walsender for one, so confirmed moves on within
// about a StandbyInterval (default 1s) rather than wal_sender_timeout/2.
func TestIdleConfirmsPastUnpublishedWrites(t *testing.T) {
	f := newFixture(t, "CREATE TABLE t (id bigint PRIMARY KEY)", "CREATE TABLE other (id bigint)")
	cfg := f.config()
	cfg.StandbyInterval = 0 // the default
	c := f.start(cfg)
	idle := c.until("Idle", func(ev cdc.Event) bool { return ev.Kind == cdc.Idle })
	c.confirmed.Store(uint64(idle.EndLSN))
	c.confirmLikeApplier()
	time.Sleep(500 * time.Millisecond) // let the walsender settle into its wait

	for i := range 3 {
		f.exec("INSERT INTO other VALUES ($1)", i)
		target := f.lsn("SELECT pg_current_wal_insert_lsn()::text")
		began := time.Now()
		waitFor(t, "confirmed to pass the insert position", func() bool {
			return pglogrepl.LSN(c.confirmed.Load()) >= target
		})
		took := time.Since(began)
		t.Logf("write %d: confirmed passed %s after %s", i, target, took)
		if took > 3*time.Second {
			t.Errorf("write %d: confirmed passed %s only after %s, want within 3s", i, target, took)
		}
		time.Sleep(time.Duration(i) * 700 * time.Millisecond)
	}
}

// TestStandbyStatusAsksForKeepalive checks the mechanism behind idle
// confirms: every periodic standby status is answered by a keepalive, even
// with no WAL at all and everything sent confirmed (the walsender then has
// no reason of its own to send one before wal_sender_timeout/2).
func TestStandbyStatusAsksForKeepalive(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	cfg.StandbyInterval = 200 * time.Millisecond
	c := f.start(cfg)
	idle := c.until("Idle", func(ev cdc.Event) bool { return ev.Kind == cdc.Idle })
	c.confirmed.Store(uint64(idle.EndLSN))
	c.confirmLikeApplier()
	time.Sleep(300 * time.Millisecond)

	before := c.stream.Stats().Keepalives
	const period = 2 * time.Second
	time.Sleep(period)
	got := c.stream.Stats().Keepalives - before
	t.Logf("%d keepalives in %s with a status every %s", got, period, cfg.StandbyInterval)
	if want := uint64(period / cfg.StandbyInterval / 2); got < want {
		t.Errorf("%d keepalives in %s, want at least %d: the server does not answer status updates", got, period, want)
	}
}

// TestStopsWhileBlockedOnConsumer is the shutdown order: the consumer stops
// reading first (out fills up and Run blocks on it), sets its final
// confirmed position, and only then is the stream's context cancelled. Run
// must return promptly and its last status must carry that position.
func TestStopsWhileBlockedOnConsumer(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	cfg.StandbyInterval = time.Hour // only the final status can carry the position
	c := f.start(cfg)

	f.exec("INSERT INTO t VALUES (0)")
	first := checkTxn(t, c.txn())
	// The consumer reads nothing more: more rows than out holds.
	f.exec("INSERT INTO t SELECT i FROM generate_series(1, 100) i")
	waitFor(t, "the stream to block on its consumer", func() bool { return len(c.events) == cap(c.events) })
	time.Sleep(100 * time.Millisecond)

	c.confirmed.Store(uint64(first.EndLSN)) // the consumer's final position
	began := time.Now()
	if err := c.stop(); err != nil {
		t.Fatal(err)
	}
	took := time.Since(began)
	t.Logf("Run returned %s after cancel", took)
	if took > 2*time.Second {
		t.Errorf("Run took %s to return after cancel while blocked on its consumer", took)
	}
	waitFor(t, "confirmed_flush_lsn to reach the final position", func() bool { return f.confirmedFlush() >= first.EndLSN })
	if got := f.confirmedFlush(); got != first.EndLSN {
		t.Errorf("confirmed_flush_lsn %s, want exactly the consumer's final %s", got, first.EndLSN)
	}
}
