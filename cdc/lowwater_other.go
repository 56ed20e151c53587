//go:build !linux

package cdc

import "net"

// setLowWater: SO_RCVLOWAT is used on Linux only.
func setLowWater(net.Conn, int) bool { return false }
