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
// flush interval (sync.flush_interval, 50ms by default) absorbs.
//
// Where the option is not available (a Unix socket, another OS), a read
// after a short one waits maxGather before it asks instead, which gathers
// the messages but not the wake-ups.
const (
	lowWater  = 64 << 10
	maxGather = 5 * time.Millisecond
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

	short bool // without lowWater: the last read was short
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
	for {
		// A read returns at once what is queued, however little; with
		// nothing queued it sleeps until lowWater bytes or the deadline.
		user := c.userDeadline()
		gather := time.Now().Add(maxGather)
		if !user.IsZero() && user.Before(gather) {
			gather = user
		}
		if err := c.Conn.SetReadDeadline(gather); err != nil {
			return 0, err
		}
		n, err := c.Conn.Read(p)
		if n > 0 || err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			c.Conn.SetReadDeadline(c.userDeadline())
			return n, err
		}
		if user := c.userDeadline(); !user.IsZero() && !time.Now().Before(user) {
			return n, err // the user's own deadline
		}
		// Only the gathering wait ended: ask again for what is queued.
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
