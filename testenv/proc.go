package testenv

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// ErrMissing reports that a binary the environment needs is not installed.
// The message names the package to install; tests fail on it, never skip.
var ErrMissing = errors.New("testenv: required binary missing (run scripts/setup.sh)")

// ErrNotRunning is returned by Kill and Stop on a server that is not running.
var ErrNotRunning = errors.New("testenv: server not running")

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago. It
// picks at random below the kernel's ephemeral range (32768 and up), so
// that the outgoing connections of tests running in parallel, which take
// ephemeral ports, cannot grab it between this check and the server's bind.
func FreePort() (int, error) {
	var err error
	for i := 0; i < 200; i++ {
		port := 20000 + rand.IntN(12000)
		var l net.Listener
		l, err = net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err == nil {
			l.Close()
			return port, nil
		}
	}
	return 0, fmt.Errorf("free port: %w", err)
}

// lookPath finds a binary in PATH or in the given extra directories.
func lookPath(name string, extra ...string) (string, error) {
	for _, d := range extra {
		p := d + "/" + name
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%w: %s", ErrMissing, name)
	}
	return p, nil
}

// proc is one child process run in its own process group, so that Kill
// takes its children with it, as kill -9 of a service would.
type proc struct {
	mu   sync.Mutex // guards cmd, done
	cmd  *exec.Cmd
	done chan struct{}
}

// start launches path with args; stdout and stderr append to logPath. When
// uid is non-nil the process runs as that user.
func (p *proc) start(path string, args []string, logPath string, cred *syscall.Credential) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		return fmt.Errorf("start %s: already running", path)
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	cmd := exec.Command(path, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", path, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	p.cmd, p.done = cmd, done
	return nil
}

// running reports whether the process has been started and not yet reaped.
func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// pid returns the process id, or 0 when not started.
func (p *proc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// signal sends sig to the process group and waits up to timeout for the
// leader to exit; after the timeout it sends SIGKILL to the group. The group
// is then killed again so that no straggler child survives.
func (p *proc) signal(sig syscall.Signal, timeout time.Duration) error {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return ErrNotRunning
	}
	pgid := cmd.Process.Pid
	_ = syscall.Kill(-pgid, sig)
	select {
	case <-done:
	case <-time.After(timeout):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-done
	}
	// Children of a killed leader (postgres backends) exit on their own when
	// they see the postmaster die; make sure of it and wait for them.
	waitGroupGone(pgid, 10*time.Second)
	p.mu.Lock()
	p.cmd, p.done = nil, nil
	p.mu.Unlock()
	return nil
}

// waitGroupGone sends SIGKILL to the process group until none of it remains.
func waitGroupGone(pgid int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(-pgid, syscall.SIGKILL); errors.Is(err, syscall.ESRCH) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// userCred returns the credential of a system user, for servers that refuse
// to run as root (initdb, postgres).
func userCred(name string) (*syscall.Credential, int, int, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return nil, 0, 0, fmt.Errorf("%w: user %q (install postgresql): %v", ErrMissing, name, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, uid, gid, nil
}

// runAs runs a command to completion (initdb, pg_basebackup) and returns its
// combined output in the error when it fails.
func runAs(ctx context.Context, cred *syscall.Credential, path string, args ...string) error {
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred}
	// On ctx end kill the whole group (pg_basebackup forks a WAL
	// streamer that would hold the output pipe open) and stop waiting.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", path, err, out)
	}
	return nil
}

// waitTCP waits until addr accepts a TCP connection or ctx ends.
func waitTCP(ctx context.Context, addr string, alive func() bool) error {
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		if alive != nil && !alive() {
			return fmt.Errorf("wait for %s: process exited", addr)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", addr, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// sendOnly sends sig to the process group without waiting.
func (p *proc) sendOnly(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return ErrNotRunning
	}
	return syscall.Kill(-p.cmd.Process.Pid, sig)
}
