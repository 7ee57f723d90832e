//go:build !linux

package mcpool

import "net"

// unreadBytes reports whether the kernel holds bytes received on nc that
// the reader has yet to read; it is known on Linux only.
func unreadBytes(nc net.Conn) bool { return false }
