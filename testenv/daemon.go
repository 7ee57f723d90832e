package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// Binaries are the project's daemons, built for tests, benchmarks and
// chaos runs.
type Binaries struct {
	Invalidator string
	Leaseproxy  string
}

// BuildBinaries builds cmd/invalidator and cmd/leaseproxy into dir with
// go build (run from inside the module).
func BuildBinaries(ctx context.Context, dir string) (Binaries, error) {
	b := Binaries{Invalidator: filepath.Join(dir, "invalidator"), Leaseproxy: filepath.Join(dir, "leaseproxy")}
	for _, x := range []struct{ out, pkg string }{
		{b.Invalidator, "github.com/pgcache/pgcache/cmd/invalidator"},
		{b.Leaseproxy, "github.com/pgcache/pgcache/cmd/leaseproxy"},
	} {
		out, err := exec.CommandContext(ctx, "go", "build", "-o", x.out, x.pkg).CombinedOutput()
		if err != nil {
			return b, fmt.Errorf("go build %s: %w\n%s", x.pkg, err, out)
		}
	}
	return b, nil
}

// Daemon is one of the project's daemons run as a child process, in its
// own process group (Kill takes its children with it, as kill -9 of a
// service would), killed if the test process dies. With Supervise set,
// like systemd with Restart=on-failure and RestartSec=1s, it restarts
// the process when it exits on its own; Kill (the fault) and Stop do not
// count as such exits. It is the one process runner of the tests, the
// benchmarks and the chaos runs.
type Daemon struct {
	Name string
	// Supervise restarts the process 1s after it exits on its own.
	Supervise bool
	// Env is added to the process's environment.
	Env      []string
	bin      string
	args     []string
	logPath  string
	httpPort int // 0: none
	log      *zap.Logger

	mu         sync.Mutex // guards cmd, done, wanted, exits, lastExit, lastCode, starts
	cmd        *exec.Cmd
	done       chan struct{}
	wanted     bool // should be running (restart on exit)
	exits      int  // exits not caused by Kill or Stop
	lastExit   string
	lastCode   int // exit code of the last exit, whatever caused it
	starts     int
	superviser sync.WaitGroup
}

// NewDaemon writes config to dir/name.yaml and prepares bin -config
// that file, with extra arguments; its output goes to dir/name.log.
// httpPort (0: none) is its /metrics listener. Start runs it.
func NewDaemon(name, bin, dir, config string, httpPort int, log *zap.Logger, extra ...string) (*Daemon, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, name+".yaml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		return nil, err
	}
	return &Daemon{Name: name, bin: bin, args: append([]string{"-config", cfg}, extra...),
		logPath: filepath.Join(dir, name+".log"), httpPort: httpPort, log: log.Named(name)}, nil
}

// Start runs the process and supervises it.
func (p *Daemon) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.wanted = true
	return p.startLocked()
}

func (p *Daemon) startLocked() error {
	if p.cmd != nil {
		return nil
	}
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(f, "=== testenv: start %s at %s\n", p.Name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.bin, p.args...)
	if len(p.Env) > 0 {
		cmd.Env = append(os.Environ(), p.Env...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	done := make(chan struct{})
	p.cmd, p.done = cmd, done
	p.starts++
	p.superviser.Add(1)
	go func() {
		defer p.superviser.Done()
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.lastCode = cmd.ProcessState.ExitCode()
		p.mu.Unlock()
		close(done)
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.cmd != cmd {
			return
		}
		p.cmd = nil
		if !p.wanted {
			return
		}
		p.exits++
		p.lastExit = fmt.Sprintf("%v: %s", err, lastLogLine(p.LogTail(4096)))
		if !p.Supervise {
			p.log.Warn("process exited on its own", zap.Error(err))
			return
		}
		p.log.Warn("process exited on its own; restarting in 1s", zap.Error(err))
		go func() {
			time.Sleep(time.Second)
			p.mu.Lock()
			defer p.mu.Unlock()
			if p.wanted && p.cmd == nil {
				if err := p.startLocked(); err != nil {
					p.log.Error("restart", zap.Error(err))
				}
			}
		}()
	}()
	return nil
}

// signal sends sig to the running process and waits for its exit.
func (p *Daemon) signal(sig syscall.Signal, wait time.Duration) error {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.wanted = false
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return nil
	}
	_ = syscall.Kill(-cmd.Process.Pid, sig)
	select {
	case <-done:
		return nil
	case <-time.After(wait):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("%s did not exit within %s of %v", p.Name, wait, sig)
	}
}

// Kill sends SIGKILL (kill -9) and waits; the process stays down until
// Start.
func (p *Daemon) Kill() error { return p.signal(syscall.SIGKILL, 10*time.Second) }

// Stop sends SIGTERM (a drain) and waits up to 40s.
func (p *Daemon) Stop() error { return p.signal(syscall.SIGTERM, 40*time.Second) }

// ExitCode is the exit code of the last exit (-1 for a signal).
func (p *Daemon) ExitCode() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastCode
}

// Wait waits until the running process exits on its own, up to d; it
// reports whether it did.
func (p *Daemon) Wait(d time.Duration) bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return true
	}
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// PID is the running process's pid, 0 if none.
func (p *Daemon) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Exits is the number of exits not caused by Kill or Stop, and the last
// one's status.
func (p *Daemon) Exits() (int, string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exits, p.lastExit
}

// Running reports whether the process runs.
func (p *Daemon) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// ConfigPath is the process's config file (a test may rewrite it and
// send SIGHUP).
func (p *Daemon) ConfigPath() string { return p.args[1] }

// LogPath is the file the process's output goes to.
func (p *Daemon) LogPath() string { return p.logPath }

// LogTail is the end of the process's log.
func (p *Daemon) LogTail(n int) string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// Metric reads one metric from the process's /metrics.
func (p *Daemon) Metric(ctx context.Context, name string) (float64, error) {
	if p.httpPort == 0 {
		return 0, fmt.Errorf("%s: no http listener", p.Name)
	}
	return Metric(ctx, fmt.Sprintf("127.0.0.1:%d", p.httpPort), name)
}

// lastLogLine is the last non-empty line of a log, shortened.
func lastLogLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	l := lines[len(lines)-1]
	if len(l) > 300 {
		l = l[:300] + "..."
	}
	return l
}
