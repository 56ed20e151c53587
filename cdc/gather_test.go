package cdc

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// tcpPair dials a loopback listener through the stream's dial wrapper.
func tcpPair(t *testing.T) (client net.Conn, server net.Conn) {
	return tcpPairGathering(t, defaultMaxGather)
}

func tcpPairGathering(t *testing.T, maxGather time.Duration) (client net.Conn, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	cfg := &pgconn.Config{DialFunc: (&net.Dialer{}).DialContext}
	gatherReads(cfg, maxGather)
	client, err = cfg.DialFunc(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestGatheringConnDeliversEverything: many small writes, one at a time as
// the walsender sends them, arrive whole and in order; a lone small one
// that never reaches the low-water mark still arrives.
func TestGatheringConnDeliversEverything(t *testing.T) {
	client, server := tcpPair(t)
	if !client.(*gatheringConn).lowWater {
		t.Log("SO_RCVLOWAT not set here: testing the fallback")
	}
	var want bytes.Buffer
	go func() {
		for i := 0; i < 20000; i++ {
			msg := []byte{byte(i), byte(i >> 8), 'm', 's', 'g'}
			server.Write(msg)
		}
	}()
	for i := 0; i < 20000; i++ {
		want.Write([]byte{byte(i), byte(i >> 8), 'm', 's', 'g'})
	}
	got := make([]byte, want.Len())
	if _, err := io.ReadFull(client, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Fatal("bytes arrived out of order or changed")
	}

	// A lone 3-byte message, far below the low-water mark.
	server.Write([]byte("end"))
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	lone := make([]byte, 3)
	if _, err := io.ReadFull(client, lone); err != nil || string(lone) != "end" {
		t.Fatalf("lone message: %q, %v", lone, err)
	}
}

// TestGatheringConnDeadline: a deadline set while a read waits ends it with
// a timeout (how the stream stops on shutdown), and the connection reads
// again after the deadline is cleared.
func TestGatheringConnDeadline(t *testing.T) {
	client, server := tcpPair(t)
	errc := make(chan error, 1)
	go func() {
		_, err := client.Read(make([]byte, 10))
		errc <- err
	}()
	// The read is waiting (nothing was written); end it.
	client.SetReadDeadline(time.Unix(1, 0))
	err := <-errc
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read after the deadline: %v, want a deadline error", err)
	}
	client.SetReadDeadline(time.Time{})
	server.Write([]byte("again"))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "again" {
		t.Fatalf("read after clearing the deadline: %q, %v", buf, err)
	}
	// CloseWrite reaches the socket: the server reads EOF.
	if err := client.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	server.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("server after CloseWrite: %d, %v; want EOF", n, err)
	}
}

// TestGatheringConnPokeReadsAtOnce: after a Poke (a deadline in the past,
// then the stream's next one), what the server sends next arrives at once,
// not after a gathering wait: a cut-over holding a lock waits for it.
func TestGatheringConnPokeReadsAtOnce(t *testing.T) {
	const gather = 3 * time.Second
	client, server := tcpPairGathering(t, gather)
	// A short read: the next one would pause to gather.
	server.Write([]byte("a"))
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(client, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	client.SetReadDeadline(time.Unix(1, 0)) // Poke
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read after the poke: %v, want a deadline error", err)
	}
	client.SetReadDeadline(time.Now().Add(10 * time.Second)) // the next standby status
	got := make(chan time.Time, 1)
	go func() {
		if _, err := io.ReadFull(client, make([]byte, 1)); err == nil {
			got <- time.Now()
		}
		close(got)
	}()
	// Write only once the read waits on the socket: data queued before it
	// would be taken at once, gathering or not.
	waitGoroutine(t, "[IO wait", "gatheringConn")
	sent := time.Now()
	server.Write([]byte("b"))
	at, ok := <-got
	if !ok {
		t.Fatal("the message after the poke did not arrive")
	}
	if d := at.Sub(sent); d > gather/2 {
		t.Fatalf("the message after a poke took %v: it waited for gathering (bound %v)", d, gather)
	}
}

// waitGoroutine waits until a goroutine whose stack mentions fn is in state.
func waitGoroutine(t *testing.T, state, fn string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); runtime.Gosched() {
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, state) && strings.Contains(g, fn) {
				return
			}
		}
	}
	t.Fatalf("no goroutine in %s within %s", state, fn)
}
