package cdc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/cdcbackfill/cdcbackfill/internal/dbconn"
	"github.com/cdcbackfill/cdcbackfill/internal/repeatlog"
)

// EventKind says what an Event reports.
type EventKind int

const (
	Begin  EventKind = iota // a transaction starts (not emitted for skipped transactions)
	Change                  // key of an inserted/updated row (new key; for an UPDATE changing the key, the new key only)
	Commit                  // the transaction ends
	Idle                    // keepalive from server while no transaction is in flight: everything up to EndLSN has been sent
	Reset                   // the connection was re-established; any transaction in flight was abandoned and will be re-sent
)

func (k EventKind) String() string {
	switch k {
	case Begin:
		return "Begin"
	case Change:
		return "Change"
	case Commit:
		return "Commit"
	case Idle:
		return "Idle"
	case Reset:
		return "Reset"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is one thing the consumer learns from the slot. Only the key of a
// changed row travels: the consumer recomputes from the current row.
type Event struct {
	Kind       EventKind
	FinalLSN   pglogrepl.LSN // Begin: commit LSN of the transaction (Begin.FinalLSN); Change: same as its Begin's
	CommitLSN  pglogrepl.LSN // Commit
	EndLSN     pglogrepl.LSN // Commit: TransactionEndLSN, the position to confirm; Idle: server WAL end
	CommitTime time.Time     // Begin and Commit
	Relation   string        // Change: "schema.table"
	KeyColumns []string      // Change: replica identity key columns in relation column order; shared, do not modify
	Key        []string      // Change: text values of KeyColumns (pgoutput text format), same order; the event's own, kept by the consumer as it likes
	Deletes    int           // Commit: number of delete/truncate messages in the transaction (for counters)
	// Xid is the transaction's top-level id (Begin, Change and Commit; 0 for
	// Idle and Reset). The walsender sends a transaction once its commit
	// record is flushed, which can be before the committing backend leaves
	// the proc array (for the whole wait for a synchronous standby): until
	// then no snapshot sees its changes. A consumer that reads rows in SQL
	// waits until Xid is no longer running before it trusts what it reads.
	Xid uint32
	// Image is what the change's row versions say beyond the key (Change
	// only): whether it was an insert, whether it set the new columns, and
	// hashes of the source columns, from which a consumer tells an
	// application that writes the new columns itself from one that does not.
	Image Image
}

// Op is the kind of row change.
type Op uint8

const (
	OpInsert Op = iota + 1
	OpUpdate
)

// Image describes a Change's row versions, as far as Config.SourceColumns
// and Config.NewColumns ask; its zero value says nothing.
type Image struct {
	Op Op
	// Source hashes the values of the source columns in the new row version;
	// OldSource in the old one, when the server sent it (REPLICA IDENTITY
	// FULL, or a changed key). 0 means unknown: a column was unchanged
	// TOAST (sent without its value), is missing, or none was configured.
	Source, OldSource uint64
	// Written: some new column is not null in the new row version.
	Written bool
}

// Config says which slot to read and how.
type Config struct {
	DSN          string // normal DSN; the package adds replication=database itself
	Slot         string // an existing pgoutput slot
	Publication  string // the publication of the migrated table
	OriginPrefix string // transactions whose Origin name starts with this are skipped (the daemon's own writes); "" skips none
	// OriginNone asks the walsender (PostgreSQL 16+) to send no
	// transaction that carries an origin: the daemon's own writes are then
	// dropped server-side, not decoded and sent to be skipped here. Only
	// where nothing else replicates into the published table: changes
	// applied by a subscription carry an origin too.
	OriginNone bool
	// KeyColumns names the columns that identify a row in Change events
	// (the table's primary key). Empty: the replica identity's columns.
	KeyColumns []string
	// SourceColumns (the columns the expressions read) and NewColumns (the
	// columns they compute) fill Event.Image; both may be empty.
	SourceColumns, NewColumns []string
	// StandbyInterval is the standby status update period; default 1s. Each
	// periodic update asks the server for a reply, a keepalive carrying how
	// far it has sent WAL, so an idle consumer hears of WAL it needs nothing
	// from (other tables, the daemon's own writes) within one interval.
	StandbyInterval time.Duration
	// MaxGather bounds how long a change may wait in the socket for more
	// to arrive, so the daemon wakes once per bound rather than once per
	// message (see gather.go); Poke ends a wait at once. Default 5ms.
	MaxGather    time.Duration
	ReconnectMin time.Duration // first reconnect delay (jittered: dbconn.Backoff); default 100ms
	ReconnectMax time.Duration // where the reconnect delay stops doubling; default 5s
	Logger       *slog.Logger  // may be nil
}

// Stats are the stream's counters since New.
type Stats struct {
	Events              uint64 // events sent to the consumer
	Transactions        uint64 // Commit events sent
	SkippedTransactions uint64 // transactions of the daemon's own origin
	Reconnects          uint64 // connection attempts after a failure
	Keepalives          uint64 // keepalive messages received from the server
	ReceivedLSN         pglogrepl.LSN
	LastCommitTime      time.Time // commit time of the last transaction received, skipped or not
}

// Stream reads one slot. Run it once at a time; Stats may be read from any
// goroutine.
type Stream struct {
	cfg Config
	log *slog.Logger

	events       atomic.Uint64
	transactions atomic.Uint64
	skipped      atomic.Uint64
	reconnects   atomic.Uint64
	keepalives   atomic.Uint64
	received     atomic.Uint64
	lastCommit   atomic.Int64 // unix nanoseconds; 0 for none

	mu   sync.Mutex
	wake *receiveDeadline // of the session in hand, for Poke
}

// Poke asks the server at once, rather than at the next StandbyInterval, how
// far it has sent WAL: its answer, once no transaction is in flight, is an
// Idle event. A caller that waits for a position (the cut-over, holding a
// lock the application waits on) learns it within a round trip.
func (s *Stream) Poke() {
	s.mu.Lock()
	rd := s.wake
	s.mu.Unlock()
	if rd != nil {
		rd.poke()
	}
}

func (s *Stream) setWake(rd *receiveDeadline) {
	s.mu.Lock()
	s.wake = rd
	s.mu.Unlock()
}

// DefaultStandbyInterval is the standby status period when Config leaves it
// zero: one small message and its answer per second.
const DefaultStandbyInterval = time.Second

// New returns a Stream for cfg with its defaults filled in.
func New(cfg Config) *Stream {
	if cfg.StandbyInterval <= 0 {
		cfg.StandbyInterval = DefaultStandbyInterval
	}
	if cfg.MaxGather <= 0 {
		cfg.MaxGather = defaultMaxGather
	}
	if cfg.ReconnectMin <= 0 {
		cfg.ReconnectMin = 100 * time.Millisecond
	}
	if cfg.ReconnectMax <= 0 {
		cfg.ReconnectMax = 5 * time.Second
	}
	cfg.ReconnectMax = max(cfg.ReconnectMax, cfg.ReconnectMin)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("slot", cfg.Slot)
	return &Stream{cfg: cfg, log: log}
}

// Stats returns the counters; safe for concurrent use.
func (s *Stream) Stats() Stats {
	st := Stats{
		Events:              s.events.Load(),
		Transactions:        s.transactions.Load(),
		SkippedTransactions: s.skipped.Load(),
		Reconnects:          s.reconnects.Load(),
		Keepalives:          s.keepalives.Load(),
		ReceivedLSN:         pglogrepl.LSN(s.received.Load()),
	}
	if ns := s.lastCommit.Load(); ns != 0 {
		st.LastCommitTime = time.Unix(0, ns)
	}
	return st
}

func (s *Stream) noteReceived(lsn pglogrepl.LSN) {
	for {
		cur := s.received.Load()
		if uint64(lsn) <= cur || s.received.CompareAndSwap(cur, uint64(lsn)) {
			return
		}
	}
}

// Run streams the slot from its confirmed position and sends Events to out,
// blocking while out is full. Standby status reports confirmed() for the
// write, flush and apply positions, every StandbyInterval (asking the server
// for a keepalive in reply, which becomes an Idle event) and whenever the
// server asks. A lost connection emits Reset and is re-established with
// backoff. Run returns nil when ctx ends, after a last standby status with
// confirmed(), or an error no reconnect can fix (ErrSlotLost, ErrSlotMissing,
// ErrPublicationMissing, ErrNotAllowed, ...). Run does not close out.
//
// Stop the consumer first and ctx second (see the package documentation):
// Run keeps the walsender fed while blocked on a consumer that no longer
// reads, returns promptly once ctx ends even then, and its last status then
// carries the consumer's final confirmed().
func (s *Stream) Run(ctx context.Context, out chan<- Event, confirmed func() pglogrepl.LSN) error {
	if s.cfg.Slot == "" || s.cfg.Publication == "" {
		return errors.New("cdc: Config.Slot and Config.Publication are required")
	}
	connCfg, err := pgconn.ParseConfig(s.cfg.DSN)
	if err != nil {
		return fmt.Errorf("cdc: parse DSN: %w", err)
	}
	connCfg.RuntimeParams["replication"] = "database"
	if connCfg.RuntimeParams["application_name"] == "" {
		connCfg.RuntimeParams["application_name"] = "cdcbackfill-cdc"
	}
	gatherReads(connCfg, s.cfg.MaxGather)

	delay := dbconn.NewBackoff(s.cfg.ReconnectMin, s.cfg.ReconnectMax)
	needReset := false
	// An outage retried with backoff says so once, then a summary per
	// interval; a connection that streams again ends it.
	outage := repeatlog.New(s.log, 0)
	defer outage.End()
	for {
		started, err := s.session(ctx, connCfg, out, confirmed, needReset)
		if ctx.Err() != nil {
			return nil
		}
		if perm := s.classify(err); perm != nil {
			s.log.Error("replication stream stopped", "err", perm)
			return perm
		}
		if started {
			// Events of that connection may have reached the consumer.
			needReset = true
			delay.Reset()
			outage.End()
		}
		s.reconnects.Add(1)
		wait := delay.Next()
		outage.Warn("replication connection lost; reconnecting", "err", err, "in", wait)
		if dbconn.Sleep(ctx, wait) != nil {
			return nil
		}
	}
}

// finalStatusTimeout bounds the write of the last standby status.
const finalStatusTimeout = 5 * time.Second

// session is one replication connection; only its goroutine touches conn.
type session struct {
	s         *Stream
	ctx       context.Context
	conn      *pgconn.PgConn
	out       chan<- Event
	confirmed func() pglogrepl.LSN
	dec       *txnDecoder
	emitFn    func(Event) error

	nextStatus time.Time
	lastIdle   pglogrepl.LSN
}

// session connects, starts the slot and streams until an error or ctx ends.
// started reports whether replication began (so events may have been sent).
func (s *Stream) session(ctx context.Context, connCfg *pgconn.Config, out chan<- Event, confirmed func() pglogrepl.LSN, reset bool) (started bool, err error) {
	conn, err := pgconn.ConnectConfig(ctx, connCfg)
	if err != nil {
		return false, fmt.Errorf("connect for replication: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()

	args := []string{
		"proto_version '1'",
		// publication_names is a list of identifiers inside a string literal.
		"publication_names " + dbconn.QuoteLiteral(pgx.Identifier{s.cfg.Publication}.Sanitize()),
	}
	if s.cfg.OriginNone {
		args = append(args, "origin 'none'")
	}
	opts := pglogrepl.StartReplicationOptions{PluginArgs: args}
	// LSN 0: the server starts at the slot's confirmed_flush_lsn.
	if err := pglogrepl.StartReplication(ctx, conn, pgx.Identifier{s.cfg.Slot}.Sanitize(), 0, opts); err != nil {
		return false, fmt.Errorf("start replication from slot %q: %w", s.cfg.Slot, err)
	}
	s.log.Info("replication started", "publication", s.cfg.Publication, "pid", conn.PID())

	ss := &session{
		s:         s,
		ctx:       ctx,
		conn:      conn,
		out:       out,
		confirmed: confirmed,
		dec:       newTxnDecoder(s.cfg.OriginPrefix, s.cfg.KeyColumns, s.cfg.SourceColumns, s.cfg.NewColumns),
	}
	ss.emitFn = ss.emit
	if reset {
		err = ss.emit(Event{Kind: Reset})
	}
	if err == nil {
		err = ss.stream()
	}
	if ctx.Err() != nil {
		// Shutting down: tell the server how far the consumer got. The
		// connection is closed next, so a deadline on it costs nothing and
		// keeps a server that reads nothing from holding up the stop.
		_ = conn.Conn().SetWriteDeadline(time.Now().Add(finalStatusTimeout))
		if serr := ss.sendStatus(false); serr != nil {
			s.log.Warn("final standby status not sent", "err", serr)
		} else {
			drainBeforeClose(conn)
		}
		return true, nil
	}
	return true, err
}

func (ss *session) stream() error {
	rd := newReceiveDeadline(ss.ctx, ss.conn.Conn())
	defer rd.stop()
	ss.s.setWake(rd)
	defer ss.s.setWake(nil)
	for {
		if rd.poked() || !time.Now().Before(ss.nextStatus) {
			if err := ss.sendStatus(true); err != nil {
				return err
			}
		}
		if err := rd.until(ss.nextStatus); err != nil {
			return err
		}
		// No context: a context per receive costs a watcher per message;
		// the socket's deadline (rd) does its work.
		raw, err := ss.conn.ReceiveMessage(context.Background())
		if err != nil {
			if ss.ctx.Err() != nil {
				return ss.ctx.Err()
			}
			if pgconn.Timeout(err) {
				continue // time for standby status
			}
			return fmt.Errorf("receive replication message: %w", err)
		}
		switch m := raw.(type) {
		case *pgproto3.CopyData:
			if err := ss.handle(m.Data); err != nil {
				return err
			}
		case *pgproto3.ErrorResponse:
			return pgconn.ErrorResponseToPgError(m)
		case *pgproto3.CopyDone:
			return errors.New("server ended the replication stream")
		case *pgproto3.NoticeResponse:
			// PostgreSQL 18 no longer fails on a missing publication: it
			// warns ("skipped loading publication") and streams nothing of
			// it. Silence would then pass for an idle application.
			if strings.HasPrefix(m.Message, "skipped loading publication") {
				return permanent(fmt.Errorf("publication %q: %w: %s", ss.s.cfg.Publication, ErrPublicationMissing, m.Message))
			}
		default:
			// ParameterStatus: nothing to act on.
		}
	}
}

func (ss *session) handle(data []byte) error {
	if len(data) == 0 {
		return nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		pkm, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return permanent(fmt.Errorf("decode keepalive: %w", err))
		}
		ss.s.keepalives.Add(1)
		if pkm.ReplyRequested {
			// The server answers with requestReply off: no ping-pong.
			if err := ss.sendStatus(true); err != nil {
				return err
			}
		}
		if !ss.dec.inTxn && pkm.ServerWALEnd > ss.lastIdle {
			ss.lastIdle = pkm.ServerWALEnd
			ss.s.noteReceived(pkm.ServerWALEnd)
			return ss.emit(Event{Kind: Idle, EndLSN: pkm.ServerWALEnd})
		}
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return permanent(fmt.Errorf("decode XLogData: %w", err))
		}
		res, err := ss.dec.decode(xld.WALData, ss.emitFn)
		if err != nil {
			return err
		}
		ss.s.noteReceived(xld.WALStart) // 0/0 for a Begin with an origin: harmless
		switch res {
		case decodedCommit:
			ss.s.transactions.Add(1)
		case decodedSkippedCommit:
			ss.s.skipped.Add(1)
		}
		if res != decodedOther {
			ss.s.noteReceived(ss.dec.commitEnd)
			ss.s.lastCommit.Store(ss.dec.commitTime.UnixNano())
		}
	}
	return nil
}

// emit sends ev to the consumer, waiting as long as it takes, and keeps the
// walsender fed with standby status meanwhile: a consumer busy for longer
// than wal_sender_timeout must not cost the connection.
func (ss *session) emit(ev Event) error {
	select {
	case ss.out <- ev:
		ss.s.events.Add(1)
		return nil
	default:
	}
	for {
		wait := time.Until(ss.nextStatus)
		if wait <= 0 {
			// No reply asked: nothing reads it while the consumer is busy.
			if err := ss.sendStatus(false); err != nil {
				return err
			}
			continue
		}
		t := time.NewTimer(wait)
		select {
		case ss.out <- ev:
			t.Stop()
			ss.s.events.Add(1)
			return nil
		case <-ss.ctx.Done():
			t.Stop()
			return ss.ctx.Err()
		case <-t.C:
		}
	}
}

// sendStatus reports confirmed() as written, flushed and applied: the server
// may then recycle WAL up to it, so it is never more than the consumer says.
//
// With reply, the walsender answers at once with a keepalive carrying sentPtr,
// how far it has read WAL (ProcessStandbyReplyMessage: replyRequested →
// WalSndKeepalive). When it has caught up that is the flush position, past
// WAL that produced no message, and handle turns it into an Idle event: a
// consumer waiting for a position it read from pg_current_wal_insert_lsn()
// gets there within a StandbyInterval rather than whenever the walsender
// pings by itself.
func (ss *session) sendStatus(reply bool) error {
	pos := ss.confirmed()
	// The final status goes out after ctx has ended: the send must not
	// depend on it (session bounds that one with a write deadline).
	err := pglogrepl.SendStandbyStatusUpdate(context.WithoutCancel(ss.ctx), ss.conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: pos,
		WALFlushPosition: pos,
		WALApplyPosition: pos,
		ReplyRequested:   reply,
	})
	ss.nextStatus = time.Now().Add(ss.s.cfg.StandbyInterval)
	if err != nil {
		return fmt.Errorf("send standby status: %w", err)
	}
	return nil
}

// receiveDeadline bounds the wait for a message by the socket's read
// deadline: the time of the next standby status, or at once when ctx ends.
type receiveDeadline struct {
	conn   net.Conn
	unhook func() bool   // unregisters the ctx hook; false once it has started
	fired  chan struct{} // closed when the hook has run

	mu     sync.Mutex
	done   bool // ctx ended: the deadline stays in the past
	poking bool // Poke asked for a status: the deadline stays in the past until taken
	at     time.Time
}

// poke ends the wait in hand so the loop sends a standby status asking for
// a reply.
func (r *receiveDeadline) poke() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return
	}
	r.poking, r.at = true, time.Time{}
	_ = r.conn.SetReadDeadline(time.Unix(1, 0))
}

// poked reports, once, that Poke was called.
func (r *receiveDeadline) poked() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.poking
	r.poking = false
	return p
}

func newReceiveDeadline(ctx context.Context, conn net.Conn) *receiveDeadline {
	r := &receiveDeadline{conn: conn, fired: make(chan struct{})}
	r.unhook = context.AfterFunc(ctx, func() {
		defer close(r.fired)
		r.mu.Lock()
		defer r.mu.Unlock()
		r.done = true
		_ = conn.SetReadDeadline(time.Unix(1, 0))
	})
	return r
}

// stop unregisters the ctx hook, or waits for it to finish: a hook running
// late would cut short the final drain, which sets its own deadline.
func (r *receiveDeadline) stop() {
	if !r.unhook() {
		<-r.fired
	}
}

// until sets the deadline to at unless it is set so already or ctx ended.
func (r *receiveDeadline) until(at time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done || r.poking || r.at.Equal(at) {
		return nil
	}
	r.at = at
	return r.conn.SetReadDeadline(at)
}

// drainBeforeClose half-closes the connection after the final status and
// reads what the walsender still sends until it hangs up. Closing with
// unread data in the socket would send a reset, and a reset can make the
// server drop the final status it has not read yet.
func drainBeforeClose(conn *pgconn.PgConn) {
	nc := conn.Conn()
	hc, ok := nc.(interface{ CloseWrite() error }) // TCP and Unix sockets
	if !ok || hc.CloseWrite() != nil {
		return
	}
	_ = nc.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, _ = io.Copy(io.Discard, nc)
}
