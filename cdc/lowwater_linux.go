package cdc

import (
	"net"
	"syscall"
)

// setLowWater sets SO_RCVLOWAT on a TCP connection; false where it cannot.
// Linux honours it for TCP in poll and epoll, which is what matters here.
func setLowWater(conn net.Conn, bytes int) bool {
	tcp, ok := conn.(*net.TCPConn)
	if !ok {
		return false
	}
	raw, err := tcp.SyscallConn()
	if err != nil {
		return false
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVLOWAT, bytes)
	}); err != nil {
		return false
	}
	return serr == nil
}
