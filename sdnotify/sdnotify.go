// Package sdnotify tells systemd about a service's state through the
// notify socket (sd_notify(3)): READY=1, STOPPING=1, RELOADING=1, STATUS=
// and WATCHDOG=1 pings, with the watchdog period taken from WATCHDOG_USEC.
// It uses only the standard library. When NOTIFY_SOCKET is unset (not run
// by systemd, or a unit that is not Type=notify) every call is a no-op.
// Deciding when the service is ready or healthy is left to the caller.
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Errors.
var (
	// ErrSocket: NOTIFY_SOCKET is neither an absolute path nor an abstract
	// socket name ("@name"); vsock addresses are not supported.
	ErrSocket = errors.New("sdnotify: unsupported notify socket")
	// ErrWatchdog: WATCHDOG_USEC or WATCHDOG_PID is not a positive integer.
	ErrWatchdog = errors.New("sdnotify: bad watchdog settings")
)

// State lines understood by systemd (see sd_notify(3)).
const (
	StateReady     = "READY=1"
	StateStopping  = "STOPPING=1"
	StateReloading = "RELOADING=1"
	StateWatchdog  = "WATCHDOG=1"
)

// sendTimeout bounds one datagram write. systemd reads its socket
// promptly; a stuck manager must not stall the service.
const sendTimeout = time.Second

// Config says where to notify and what watchdog systemd enforces.
type Config struct {
	// Socket is NOTIFY_SOCKET: an absolute path of a unixgram socket, or
	// an abstract socket name starting with "@". Empty: every call is a
	// no-op.
	Socket string
	// WatchdogInterval is systemd's WatchdogSec for this process
	// (WATCHDOG_USEC). The service must ping at least this often; pinging
	// every half of it is the usual period. Zero: no watchdog.
	WatchdogInterval time.Duration
}

// Validate checks the socket's form and the interval's sign.
func (c Config) Validate() error {
	if c.Socket != "" && !strings.HasPrefix(c.Socket, "/") && !strings.HasPrefix(c.Socket, "@") {
		return fmt.Errorf("%w: %q (want an absolute path or @name)", ErrSocket, c.Socket)
	}
	if len(c.Socket) < 2 && c.Socket != "" {
		return fmt.Errorf("%w: %q is too short", ErrSocket, c.Socket)
	}
	if c.WatchdogInterval < 0 {
		return fmt.Errorf("%w: interval %s is negative", ErrWatchdog, c.WatchdogInterval)
	}
	return nil
}

// ConfigFromEnv reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as
// systemd sets them. A WATCHDOG_PID naming another process (the variables
// were inherited from a parent) means no watchdog for this one.
func ConfigFromEnv() (Config, error) {
	wd, err := WatchdogInterval()
	c := Config{Socket: os.Getenv("NOTIFY_SOCKET"), WatchdogInterval: wd}
	if err != nil {
		return c, err
	}
	return c, c.Validate()
}

// WatchdogInterval returns the watchdog interval systemd set for this
// process (WATCHDOG_USEC), or 0 when there is none: the variable is unset,
// or WATCHDOG_PID names another process. Ping every half of it.
func WatchdogInterval() (time.Duration, error) {
	s := os.Getenv("WATCHDOG_USEC")
	if s == "" {
		return 0, nil
	}
	usec, err := strconv.ParseUint(s, 10, 63)
	if err != nil || usec == 0 {
		return 0, fmt.Errorf("%w: WATCHDOG_USEC=%q", ErrWatchdog, s)
	}
	if p := os.Getenv("WATCHDOG_PID"); p != "" {
		pid, err := strconv.Atoi(p)
		if err != nil || pid <= 0 {
			return 0, fmt.Errorf("%w: WATCHDOG_PID=%q", ErrWatchdog, p)
		}
		if pid != os.Getpid() {
			return 0, nil
		}
	}
	if usec > uint64(1<<63-1)/uint64(time.Microsecond) {
		return 0, fmt.Errorf("%w: WATCHDOG_USEC=%q is too large", ErrWatchdog, s)
	}
	return time.Duration(usec) * time.Microsecond, nil
}

// Notifier sends state to systemd. Its methods are safe for concurrent
// use; each sends one datagram and returns once it is written. A Notifier
// needs no closing.
type Notifier struct {
	cfg  Config
	addr *net.UnixAddr // nil: disabled

	mu     sync.Mutex // guards status
	status string     // last STATUS= set with Status, restored after an unhealthy spell
}

// New returns a Notifier for cfg.
func New(cfg Config) (*Notifier, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := &Notifier{cfg: cfg}
	if cfg.Socket != "" {
		// The net package maps a leading '@' to Linux's abstract namespace.
		n.addr = &net.UnixAddr{Name: cfg.Socket, Net: "unixgram"}
	}
	return n, nil
}

// FromEnv returns a Notifier configured by ConfigFromEnv. On error it also
// returns a usable Notifier with whatever part of the environment was
// valid (a no-op one if the socket was not), so a caller may log the
// error and carry on.
func FromEnv() (*Notifier, error) {
	c, err := ConfigFromEnv()
	if err != nil {
		if c.Validate() != nil {
			c = Config{}
		}
		n, _ := New(c)
		return n, err
	}
	return New(c)
}

// Enabled reports whether notifications are sent (NOTIFY_SOCKET was set).
func (n *Notifier) Enabled() bool { return n.addr != nil }

// WatchdogInterval is the interval systemd enforces; 0: no watchdog.
func (n *Notifier) WatchdogInterval() time.Duration {
	if n.addr == nil {
		return 0
	}
	return n.cfg.WatchdogInterval
}

// WatchdogPeriod is how often to ping: half the interval; 0: no watchdog.
func (n *Notifier) WatchdogPeriod() time.Duration { return n.WatchdogInterval() / 2 }

// Notify sends state lines ("KEY=value") in one datagram. A line must not
// contain a newline. It is a no-op when the Notifier is disabled.
func (n *Notifier) Notify(lines ...string) error {
	if n.addr == nil || len(lines) == 0 {
		return nil
	}
	for _, l := range lines {
		if strings.ContainsRune(l, '\n') || !strings.ContainsRune(l, '=') {
			return fmt.Errorf("sdnotify: bad state line %q", l)
		}
	}
	conn, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sdnotify: dial %s: %w", n.addr.Name, err)
	}
	defer conn.Close()
	if err := conn.SetWriteDeadline(time.Now().Add(sendTimeout)); err != nil {
		return fmt.Errorf("sdnotify: %w", err)
	}
	if _, err := conn.Write([]byte(strings.Join(lines, "\n") + "\n")); err != nil {
		return fmt.Errorf("sdnotify: send %s: %w", n.addr.Name, err)
	}
	return nil
}

// Ready says startup is finished: READY=1. With Type=notify, systemd
// starts dependent units and considers `systemctl start` done only now.
func (n *Notifier) Ready() error { return n.Notify(StateReady) }

// Stopping says the service is shutting down (draining): STOPPING=1.
func (n *Notifier) Stopping() error { return n.Notify(StateStopping) }

// Reloading says a reload has started: RELOADING=1 with MONOTONIC_USEC,
// as systemd 253+ requires for Type=notify-reload (older versions ignore
// the extra line). Send Ready when the reload is done.
func (n *Notifier) Reloading() error {
	if usec, ok := monotonicUsec(); ok {
		return n.Notify(StateReloading, "MONOTONIC_USEC="+strconv.FormatUint(usec, 10))
	}
	return n.Notify(StateReloading)
}

// Status sets the one-line status `systemctl status` shows: STATUS=s.
// Newlines in s become spaces.
func (n *Notifier) Status(s string) error {
	s = oneLine(s)
	n.mu.Lock()
	n.status = s
	n.mu.Unlock()
	return n.Notify("STATUS=" + s)
}

// Watchdog pings the watchdog: WATCHDOG=1. Send it at least every
// WatchdogPeriod, and only while the service is healthy (see RunWatchdog).
func (n *Notifier) Watchdog() error { return n.Notify(StateWatchdog) }

func oneLine(s string) string {
	return strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(s)
}
