package cdc

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// The walsender writes every message to the socket on its own, one send per
// change. A reader always waiting on the socket is woken for each of them:
// under a busy table that was most of the daemon's CPU (parking and waking
// in epoll), and the wake-ups cost the walsender too, on the same cores as
// the application. So the stream's socket asks the kernel not to report it
// readable before lowWater bytes are queued (SO_RCVLOWAT), and every read
// waits at most the gather bound (Config.MaxGather) for that: messages then
// arrive hundreds per read, and a lone message waits no longer than the
// bound. The daemon sets it to the applier's flush interval
// (sync.flush_interval, 50ms by default), which a change waits anyway: on
// a host where a wake-up costs tens of µs (a VM), 5ms bounds made the
// reader wake 200 times a second, half of the daemon's CPU at 3000
// writes/s. A caller that needs the stream now (a cut-over, a catch-up)
// pokes it, which ends the wait at once. When the waits bring nothing for
// a while (1, 2, then 4 bounds: an idle stream), the socket goes back to
// waking the reader for any byte, as a plain one, so an idle daemon does
// not wake on every bound; the first read with data turns gathering back
// on.
//
// Where the option is not available (a Unix socket, another OS), a read
// after a short one waits the bound before it asks instead, which gathers
// the messages but not the wake-ups.
const (
	lowWater = 64 << 10
	// defaultMaxGather is Config.MaxGather's default.
	defaultMaxGather = 5 * time.Millisecond
	// idleGathers is how many bounds of waiting with nothing read make the
	// socket a plain one again.
	idleGathers = 4
	// shortRead is a read that left most of a large buffer empty.
	shortRead = 2048
	// hurryFor is how long reads gather nothing after a Poke.
	hurryFor = 250 * time.Millisecond
)

// readBuffer is what one read may take from the socket: the client library
// reads 8KB at a time, which under load was still hundreds of reads a
// second.
const readBuffer = 256 << 10

// gatheringConn is the stream's connection with reads that gather messages.
type gatheringConn struct {
	net.Conn
	lowWater  bool          // SO_RCVLOWAT is set: the kernel gathers, reads wait at most maxGather
	maxGather time.Duration // the longest a read waits for messages to gather
	buf       *bufio.Reader // over gather

	mu       sync.Mutex
	deadline time.Time     // the read deadline its user set; zero: none
	wake     chan struct{} // a deadline within the gathering wait was set
	hurry    time.Time     // until then reads take what comes as it comes (see setUserDeadline)

	short    bool          // the last read was short
	lastRead time.Time     // when the last read with data returned
	wait     time.Duration // with lowWater: the next wait's bound
	idle     bool          // with lowWater: SO_RCVLOWAT is 1 until data comes
}

func (c *gatheringConn) SetDeadline(t time.Time) error {
	if err := c.setUserDeadline(t); err != nil {
		return err
	}
	return c.Conn.SetWriteDeadline(t)
}

func (c *gatheringConn) SetReadDeadline(t time.Time) error { return c.setUserDeadline(t) }

// setUserDeadline sets the read deadline its user asked for. One that falls
// within a gathering wait cuts that wait short; one already past (a Poke,
// the stream's context ending) also makes reads gather nothing for
// hurryFor: whoever poked
// waits for what the server sends next (a keepalive's reply, the WAL of a
// cut-over), and gathering would hold each of those messages up to a bound.
// The socket's own deadline is set under the same lock as gather's, so
// neither overwrites a newer one of the other.
func (c *gatheringConn) setUserDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadline = t
	if now := time.Now(); !t.IsZero() && t.Before(now.Add(c.maxGather)) {
		if !t.After(now) { // a Poke or the end: the caller wants what comes next
			c.hurry = now.Add(hurryFor)
		}
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	return c.Conn.SetReadDeadline(t)
}

// armGather sets the socket's read deadline to wait at most d, or less if
// the user's deadline comes first.
func (c *gatheringConn) armGather(d time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	at := time.Now().Add(d)
	if !c.deadline.IsZero() && c.deadline.Before(at) {
		at = c.deadline
	}
	return c.Conn.SetReadDeadline(at)
}

// disarmGather gives the socket back the user's deadline.
func (c *gatheringConn) disarmGather() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.Conn.SetReadDeadline(c.deadline)
}

// hurrying reports whether reads should take what comes at once.
func (c *gatheringConn) hurrying() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Before(c.hurry)
}

// pause waits d, or less if the user's deadline cuts it short.
func (c *gatheringConn) pause(d time.Duration) {
	user := c.userDeadline()
	if c.hurrying() || !user.IsZero() && !time.Now().Add(d).Before(user) {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-c.wake:
	}
}

func (c *gatheringConn) userDeadline() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.deadline
}

func (c *gatheringConn) Read(p []byte) (int, error) { return c.buf.Read(p) }

// CloseWrite half-closes the socket (see drainBeforeClose).
func (c *gatheringConn) CloseWrite() error {
	if hc, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return hc.CloseWrite()
	}
	return errors.ErrUnsupported
}

// gatherer is the socket side of the buffer.
type gatherer struct{ c *gatheringConn }

func (g gatherer) Read(p []byte) (int, error) { return g.c.gather(p) }

// gather reads from the socket, waiting for messages to gather.
func (c *gatheringConn) gather(p []byte) (int, error) {
	if !c.lowWater {
		if c.short {
			c.pause(c.maxGather)
		}
		n, err := c.Conn.Read(p)
		c.short = n < shortRead && n < len(p)
		return n, err
	}
	if !c.idle && c.hurrying() && setLowWater(c.Conn, 1) {
		// A plain socket until the hurry ends: the first read with data
		// after it turns gathering back on.
		c.idle = true
		if err := c.disarmGather(); err != nil {
			return 0, err
		}
	}
	if c.idle {
		n, err := c.Conn.Read(p) // under the user's deadline only
		if n > 0 && !c.hurrying() && setLowWater(c.Conn, lowWater) {
			c.idle, c.wait = false, c.maxGather
		}
		c.noteRead(n)
		return n, err
	}
	// SO_RCVLOWAT holds back only a wait for data: a read with anything at
	// all queued returns it at once. When messages trickle in (a few
	// thousand transactions a second), each read found one more and the
	// stream read a message a syscall; after a short read, the next waits
	// out the bound first so messages gather in the socket meanwhile. A
	// deadline of the user's (a standby status due, a Poke) cuts it short.
	if c.short {
		if rest := time.Until(c.lastRead.Add(c.maxGather)); rest > 0 {
			c.pause(rest)
		}
	}
	for {
		// A read returns at once what is queued, however little; with
		// nothing queued it sleeps until lowWater bytes or the deadline.
		if err := c.armGather(max(c.wait, c.maxGather)); err != nil {
			return 0, err
		}
		n, err := c.Conn.Read(p)
		if n > 0 || err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			c.wait = c.maxGather
			_ = c.disarmGather()
			c.noteRead(n)
			return n, err
		}
		if user := c.userDeadline(); !user.IsZero() && !time.Now().Before(user) {
			return n, err // the user's own deadline
		}
		// Only the gathering wait ended: ask again for what is queued (the
		// read takes it at once), waiting longer if nothing is, and after
		// the longest wait as a plain socket.
		if c.wait >= idleGathers*c.maxGather && setLowWater(c.Conn, 1) {
			c.idle = true
			if err := c.disarmGather(); err != nil {
				return 0, err
			}
			return c.gather(p)
		}
		c.wait = min(2*max(c.wait, c.maxGather), idleGathers*c.maxGather)
	}
}

// noteRead remembers a read that brought data, and whether it was short.
func (c *gatheringConn) noteRead(n int) {
	if n > 0 {
		c.lastRead, c.short = time.Now(), n < shortRead
	}
}

// gatherReads makes cfg's connections gather replication messages, each
// read waiting at most maxGather.
func gatherReads(cfg *pgconn.Config, maxGather time.Duration) {
	dial := cfg.DialFunc
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		c := &gatheringConn{Conn: conn, lowWater: setLowWater(conn, lowWater), maxGather: maxGather, wake: make(chan struct{}, 1)}
		c.buf = bufio.NewReaderSize(gatherer{c}, readBuffer)
		return c, nil
	}
}
