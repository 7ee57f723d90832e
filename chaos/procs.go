package chaos

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

	"github.com/pgcache/pgcache/testenv"
)

// Binaries are the daemons a World runs.
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

// Proc is one supervised daemon. Like systemd with Restart=on-failure
// and RestartSec=1s, it restarts the process when it exits on its own;
// Kill (the fault) and Stop do not count as such exits.
type Proc struct {
	Name     string
	bin      string
	args     []string
	logPath  string
	httpPort int // 0: none
	log      *zap.Logger

	mu         sync.Mutex // guards cmd, done, wanted, exits, lastExit, starts
	cmd        *exec.Cmd
	done       chan struct{}
	wanted     bool // should be running (restart on exit)
	exits      int  // exits not caused by Kill or Stop
	lastExit   string
	starts     int
	superviser sync.WaitGroup
}

// newProc prepares a process; Start runs it.
func newProc(name, bin, dir, config string, httpPort int, log *zap.Logger, extra ...string) (*Proc, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, name+".yaml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		return nil, err
	}
	return &Proc{Name: name, bin: bin, args: append([]string{"-config", cfg}, extra...),
		logPath: filepath.Join(dir, name+".log"), httpPort: httpPort, log: log.Named(name)}, nil
}

// Start runs the process and supervises it.
func (p *Proc) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.wanted = true
	return p.startLocked()
}

func (p *Proc) startLocked() error {
	if p.cmd != nil {
		return nil
	}
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(f, "=== chaos: start %s at %s\n", p.Name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.bin, p.args...)
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
func (p *Proc) signal(sig syscall.Signal, wait time.Duration) error {
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
func (p *Proc) Kill() error { return p.signal(syscall.SIGKILL, 10*time.Second) }

// Stop sends SIGTERM (a drain) and waits up to 40s.
func (p *Proc) Stop() error { return p.signal(syscall.SIGTERM, 40*time.Second) }

// Exits is the number of exits not caused by Kill or Stop, and the last
// one's status.
func (p *Proc) Exits() (int, string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exits, p.lastExit
}

// Running reports whether the process runs.
func (p *Proc) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// LogTail is the end of the process's log.
func (p *Proc) LogTail(n int) string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// Metric reads one metric from the process's /metrics.
func (p *Proc) Metric(ctx context.Context, name string) (float64, error) {
	if p.httpPort == 0 {
		return 0, fmt.Errorf("%s: no http listener", p.Name)
	}
	return testenv.Metric(ctx, fmt.Sprintf("127.0.0.1:%d", p.httpPort), name)
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
