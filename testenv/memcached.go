package testenv

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Memcached is one memcached server from the system package, listening on
// 127.0.0.1. Kill, Stop and Start keep its port, so clients reconnect to the
// same address; its data is gone after a restart, as with a real restart.
type Memcached struct {
	Name string
	Addr string // host:port
	Port int
	dir  string
	bin  string
	args []string
	p    proc
}

// StartMemcached starts a memcached with 64 MB of memory and a log in dir.
// Extra args are appended to memcached's command line.
func StartMemcached(ctx context.Context, name, dir string, extra ...string) (*Memcached, error) {
	bin, err := lookPath("memcached", "/usr/bin")
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("memcached dir: %w", err)
	}
	m := &Memcached{
		Name: name,
		Addr: "127.0.0.1:" + strconv.Itoa(port),
		Port: port,
		dir:  dir,
		bin:  bin,
	}
	// -u root: memcached refuses to run as root without it. -U 0: no UDP.
	m.args = append([]string{"-u", "root", "-l", "127.0.0.1", "-p", strconv.Itoa(port), "-U", "0", "-m", "64", "-c", "4096", "-t", "2"}, extra...)
	if err := m.Start(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// Start starts the server again on its port after Stop or Kill.
func (m *Memcached) Start(ctx context.Context) error {
	if err := m.p.start(m.bin, m.args, filepath.Join(m.dir, "memcached.log"), nil); err != nil {
		return fmt.Errorf("memcached %s: %w", m.Name, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := waitTCP(ctx, m.Addr, m.p.running); err != nil {
		_ = m.p.signal(syscall.SIGKILL, time.Second)
		return fmt.Errorf("memcached %s: %w (log %s)", m.Name, err, filepath.Join(m.dir, "memcached.log"))
	}
	return nil
}

// Kill sends SIGKILL, as kill -9 would.
func (m *Memcached) Kill() error { return m.p.signal(syscall.SIGKILL, 5*time.Second) }

// Stop sends SIGTERM and waits for the server to exit.
func (m *Memcached) Stop() error { return m.p.signal(syscall.SIGTERM, 5*time.Second) }

// Running reports whether the process is alive.
func (m *Memcached) Running() bool { return m.p.running() }

// PID returns the process id, or 0 when it is not running.
func (m *Memcached) PID() int { return m.p.pid() }

// Close stops the server if it runs.
func (m *Memcached) Close() error {
	if m.p.running() {
		return m.Kill()
	}
	return nil
}

// Pause freezes the server with SIGSTOP: connections stay open and
// requests hang, as with a hung or partitioned server; its data is kept.
func (m *Memcached) Pause() error { return m.p.sendOnly(syscall.SIGSTOP) }

// Resume continues a paused server with SIGCONT.
func (m *Memcached) Resume() error { return m.p.sendOnly(syscall.SIGCONT) }
