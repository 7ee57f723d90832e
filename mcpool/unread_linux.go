package mcpool

import (
	"net"
	"syscall"
	"unsafe"
)

// unreadBytes reports whether the kernel holds bytes received on nc that
// the reader has yet to read (ioctl TIOCINQ, alias FIONREAD): the server
// answered, the client is too busy to read. It is asked only when a
// request that was written times out.
func unreadBytes(nc net.Conn) bool {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var n int32 // a C int
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCINQ, uintptr(unsafe.Pointer(&n)))
	}); err != nil || errno != 0 {
		return false
	}
	return n > 0
}
