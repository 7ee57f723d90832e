//go:build !linux

package sdnotify

// monotonicUsec is only known on Linux, the only system with systemd.
func monotonicUsec() (uint64, bool) { return 0, false }
