package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// natsModule is the module whose main package is the nats-server binary;
// go.mod requires it for the embedded servers already.
const natsModule = "github.com/nats-io/nats-server/v2"

// natsProcess is a nats-server run as a child process from a generated
// configuration file, for a DC whose cluster has several servers: its
// Kill is a real kill -9.
type natsProcess struct {
	bin         string
	dir         string // holds nats.conf, nats.log and the JetStream store
	clusterPort int
	monitorPort int
	routes      []int               // every cluster port of the DC, its own included
	advertise   string              // gateway address the others are told
	remotes     map[string][]string // cluster -> gateway addresses, through Links
	p           proc
}

// natsPorts are the ports given to NATS processes in this process: a
// server that is down keeps its ports for its restart, so none is given
// twice.
var natsPorts = struct {
	mu   sync.Mutex
	used map[int]bool
}{used: map[int]bool{}}

// newNATSProcess prepares (but does not start) server name of cluster
// (the DC) with its files under dir.
func newNATSProcess(name, cluster, dir, bin string) (*NATS, error) {
	var ports [4]int
	natsPorts.mu.Lock()
	for i := range ports {
		for {
			p, err := FreePort()
			if err != nil {
				natsPorts.mu.Unlock()
				return nil, err
			}
			if !natsPorts.used[p] {
				natsPorts.used[p] = true
				ports[i] = p
				break
			}
		}
	}
	natsPorts.mu.Unlock()
	if err := os.MkdirAll(filepath.Join(dir, "jetstream"), 0o755); err != nil {
		return nil, fmt.Errorf("nats dir: %w", err)
	}
	return &NATS{Name: name, Cluster: cluster, Port: ports[0], GWPort: ports[1],
		ext: &natsProcess{bin: bin, dir: dir, clusterPort: ports[2], monitorPort: ports[3]}}, nil
}

// config is the server's configuration file.
func (x *natsProcess) config(n *NATS) string {
	q := strconv.Quote
	var b strings.Builder
	fmt.Fprintf(&b, "server_name: %s\nlisten: \"127.0.0.1:%d\"\nhttp: \"127.0.0.1:%d\"\n", q(n.Name), n.Port, x.monitorPort)
	fmt.Fprintf(&b, "jetstream {\n  store_dir: %s\n  max_memory_store: 256MB\n  max_file_store: 4GB\n}\n", q(filepath.Join(x.dir, "jetstream")))
	routes := make([]string, len(x.routes))
	for i, p := range x.routes {
		routes[i] = q(fmt.Sprintf("nats://127.0.0.1:%d", p))
	}
	fmt.Fprintf(&b, "cluster {\n  name: %s\n  listen: \"127.0.0.1:%d\"\n  routes: [%s]\n}\n", q(n.Cluster), x.clusterPort, strings.Join(routes, ", "))
	fmt.Fprintf(&b, "gateway {\n  name: %s\n  listen: \"127.0.0.1:%d\"\n", q(n.Cluster), n.GWPort)
	if x.advertise != "" {
		fmt.Fprintf(&b, "  advertise: %s\n", q(x.advertise))
	}
	names := make([]string, 0, len(x.remotes))
	for c := range x.remotes {
		names = append(names, c)
	}
	sort.Strings(names)
	b.WriteString("  gateways: [\n")
	for _, c := range names {
		urls := make([]string, len(x.remotes[c]))
		for i, a := range x.remotes[c] {
			urls[i] = q("nats://" + a)
		}
		fmt.Fprintf(&b, "    {name: %s, urls: [%s]}\n", q(c), strings.Join(urls, ", "))
	}
	b.WriteString("  ]\n}\n")
	return b.String()
}

// start writes the configuration, starts the process and waits until it
// accepts clients (it listens for clients last, after JetStream has
// recovered its store).
func (x *natsProcess) start(n *NATS) error {
	if x.p.running() {
		return fmt.Errorf("nats %s: already running", n.Name)
	}
	cfg := filepath.Join(x.dir, "nats.conf")
	if err := os.WriteFile(cfg, []byte(x.config(n)), 0o644); err != nil {
		return fmt.Errorf("nats %s: %w", n.Name, err)
	}
	logPath := filepath.Join(x.dir, "nats.log")
	if err := x.p.start(x.bin, []string{"-c", cfg}, logPath, nil); err != nil {
		return fmt.Errorf("nats %s: %w", n.Name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := waitTCP(ctx, fmt.Sprintf("127.0.0.1:%d", n.Port), x.p.running); err != nil {
		_ = x.p.signal(syscall.SIGKILL, time.Second)
		tail, _ := os.ReadFile(logPath)
		if len(tail) > 2000 {
			tail = tail[len(tail)-2000:]
		}
		return fmt.Errorf("nats %s: %w (log %s ends: %s)", n.Name, err, logPath, tail)
	}
	return nil
}

// gatewaysConnected asks the monitoring endpoint for the outbound gateways.
func (x *natsProcess) gatewaysConnected() int {
	if !x.p.running() {
		return 0
	}
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/gatewayz", x.monitorPort))
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var gz struct {
		Outbound map[string]json.RawMessage `json:"outbound_gateways"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&gz); err != nil {
		return 0
	}
	return len(gz.Outbound)
}

var natsBin struct {
	mu   sync.Mutex
	path string
}

// NATSServerBinary returns the path of a nats-server binary of the version
// go.mod requires, building it on first use with go build (offline, from
// the module cache) into $XDG_CACHE_HOME/pgcache (by default
// ~/.cache/pgcache) as nats-server-<version>. $PGCACHE_NATS_SERVER, when
// set, names a binary to use instead. It must run inside the module.
func NATSServerBinary(ctx context.Context) (string, error) {
	if p := os.Getenv("PGCACHE_NATS_SERVER"); p != "" {
		return p, nil
	}
	natsBin.mu.Lock()
	defer natsBin.mu.Unlock()
	if natsBin.path != "" {
		return natsBin.path, nil
	}
	version := natsModuleVersion(ctx)
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "pgcache")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		// A read-only home: build into the temporary directory instead.
		dir = filepath.Join(os.TempDir(), "pgcache")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", fmt.Errorf("nats-server binary: %w", err)
		}
	}
	path := filepath.Join(dir, "nats-server-"+version)
	if fi, err := os.Stat(path); err == nil && !fi.IsDir() && version != "unknown" {
		natsBin.path = path
		return path, nil
	}
	// Build beside it and rename, so that test processes building at the
	// same time never run a half-written file.
	tmp, err := os.CreateTemp(dir, "nats-server-build-*")
	if err != nil {
		return "", fmt.Errorf("nats-server binary: %w", err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	out, err := exec.CommandContext(ctx, "go", "build", "-o", tmp.Name(), natsModule).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%w: go build %s: %v\n%s", ErrMissing, natsModule, err, out)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", fmt.Errorf("nats-server binary: %w", err)
	}
	natsBin.path = path
	return path, nil
}

// natsModuleVersion is the nats-server version go.mod requires: from the
// build info, which a test binary lacks, else from go list.
func natsModuleVersion(ctx context.Context) string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path != natsModule {
				continue
			}
			if d.Replace != nil {
				d = d.Replace
			}
			if d.Version != "" && d.Version != "(devel)" {
				return d.Version
			}
		}
	}
	out, err := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Version}}", natsModule).Output()
	if v := strings.TrimSpace(string(out)); err == nil && strings.HasPrefix(v, "v") {
		return v
	}
	return "unknown"
}

// NATSURL is every NATS server's client URL in the DC, comma-joined, for
// nats.Connect: a client fails over among them.
func (d *DC) NATSURL() string {
	urls := make([]string, len(d.NATSServers))
	for i, n := range d.NATSServers {
		urls[i] = n.URL()
	}
	return strings.Join(urls, ",")
}

// KillNATS kills every NATS server of the DC at once (SIGKILL for
// processes), as losing the datacenter would. Servers already down are
// skipped.
func (d *DC) KillNATS() error {
	return d.eachNATS(func(n *NATS) error {
		if err := n.Kill(); err != nil && !errors.Is(err, ErrNotRunning) {
			return err
		}
		return nil
	})
}

// StopNATS stops every NATS server of the DC (SIGTERM for processes).
// Servers already down are skipped.
func (d *DC) StopNATS() error {
	return d.eachNATS(func(n *NATS) error {
		if err := n.Stop(); err != nil && !errors.Is(err, ErrNotRunning) {
			return err
		}
		return nil
	})
}

// StartNATS starts every NATS server of the DC that is not running, in
// parallel, on the same ports and stores, and waits until each accepts
// clients.
func (d *DC) StartNATS() error {
	return d.eachNATS(func(n *NATS) error {
		if n.Running() {
			return nil
		}
		return n.Start()
	})
}

func (d *DC) eachNATS(f func(*NATS) error) error {
	errs := make([]error, len(d.NATSServers))
	var wg sync.WaitGroup
	for i, n := range d.NATSServers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(n)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// NATSServer returns the NATS server with that server name, in any DC, or
// nil: the server a stream's cluster info names as leader or replica.
func (e *Env) NATSServer(name string) *NATS {
	for _, dc := range e.DCs {
		for _, n := range dc.NATSServers {
			if n.Name == name {
				return n
			}
		}
	}
	return nil
}
