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
// waits at most maxGather for that: messages then arrive hundreds per read,
// and a lone message waits no longer than maxGather, which the applier's
// flush interval (sync.flush_interval, 50ms by default) absorbs. When the
// waits bring nothing for a while (5, 10, then 20ms: an idle stream), the
// socket goes back to waking the reader for any byte, as a plain one, so an
// idle daemon does not wake 200 times a second; the first read with data
// turns gathering back on.
//
// Where the option is not available (a Unix socket, another OS), a read
// after a short one waits maxGather before it asks instead, which gathers
// the messages but not the wake-ups.
const (
	lowWater      = 64 << 10
	maxGather     = 5 * time.Millisecond
	maxIdleGather = 20 * time.Millisecond
	// shortRead is a read that left most of a large buffer empty.
	shortRead = 2048
)

// readBuffer is what one read may take from the socket: the client library
// reads 8KB at a time, which under load was still hundreds of reads a
// second.
const readBuffer = 256 << 10

// gatheringConn is the stream's connection with reads that gather messages.
type gatheringConn struct {
	net.Conn
	lowWater bool          // SO_RCVLOWAT is set: the kernel gathers, reads wait at most maxGather
	buf      *bufio.Reader // over gather

	mu       sync.Mutex
	deadline time.Time // the read deadline its user set; zero: none

	short    bool          // the last read was short
	lastRead time.Time     // when the last read with data returned
	wait     time.Duration // with lowWater: the next wait's bound
	idle     bool          // with lowWater: SO_RCVLOWAT is 1 until data comes
}

func (c *gatheringConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return c.Conn.SetDeadline(t)
}

func (c *gatheringConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return c.Conn.SetReadDeadline(t)
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
			time.Sleep(maxGather)
		}
		n, err := c.Conn.Read(p)
		c.short = n < shortRead && n < len(p)
		return n, err
	}
	if c.idle {
		n, err := c.Conn.Read(p) // under the user's deadline only
		if n > 0 && setLowWater(c.Conn, lowWater) {
			c.idle, c.wait = false, maxGather
		}
		c.noteRead(n)
		return n, err
	}
	// SO_RCVLOWAT holds back only a wait for data: a read with anything at
	// all queued returns it at once. When messages trickle in (a few
	// thousand transactions a second), each read found one more and the
	// stream read a message a syscall; after a short read, the next waits
	// out maxGather first so messages gather in the socket meanwhile. A
	// deadline of the user's (a standby status due, a Poke) cuts it short.
	if c.short {
		if rest := time.Until(c.lastRead.Add(maxGather)); rest > 0 {
			user := c.userDeadline()
			if user.IsZero() || time.Now().Add(rest).Before(user) {
				time.Sleep(rest)
			}
		}
	}
	for {
		// A read returns at once what is queued, however little; with
		// nothing queued it sleeps until lowWater bytes or the deadline.
		user := c.userDeadline()
		gather := time.Now().Add(max(c.wait, maxGather))
		if !user.IsZero() && user.Before(gather) {
			gather = user
		}
		if err := c.Conn.SetReadDeadline(gather); err != nil {
			return 0, err
		}
		n, err := c.Conn.Read(p)
		if n > 0 || err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			c.wait = maxGather
			c.Conn.SetReadDeadline(c.userDeadline())
			c.noteRead(n)
			return n, err
		}
		if user := c.userDeadline(); !user.IsZero() && !time.Now().Before(user) {
			return n, err // the user's own deadline
		}
		// Only the gathering wait ended: ask again for what is queued (the
		// read takes it at once), waiting longer if nothing is, and after
		// the longest wait as a plain socket.
		if c.wait >= maxIdleGather && setLowWater(c.Conn, 1) {
			c.idle = true
			if err := c.Conn.SetReadDeadline(c.userDeadline()); err != nil {
				return 0, err
			}
			return c.gather(p)
		}
		c.wait = min(2*max(c.wait, maxGather), maxIdleGather)
	}
}

// noteRead remembers a read that brought data, and whether it was short.
func (c *gatheringConn) noteRead(n int) {
	if n > 0 {
		c.lastRead, c.short = time.Now(), n < shortRead
	}
}

// gatherReads makes cfg's connections gather replication messages.
func gatherReads(cfg *pgconn.Config) {
	dial := cfg.DialFunc
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		c := &gatheringConn{Conn: conn, lowWater: setLowWater(conn, lowWater)}
		c.buf = bufio.NewReaderSize(gatherer{c}, readBuffer)
		return c, nil
	}
}
