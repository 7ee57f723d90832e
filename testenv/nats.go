package testenv

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NATS is one nats-server with JetStream. Its gateway joins it to the
// other datacenters' servers into a supercluster. A DC with one server
// (Options.NATSPerDC 0 or 1) embeds it in this process: Stop and Kill both
// shut it down, since an in-process server cannot be sent kill -9. A DC
// with several runs each as a child process (see natscluster.go): Kill is
// SIGKILL, Stop is SIGTERM. Either way Start brings the server back on the
// same ports with the same JetStream store.
type NATS struct {
	Name    string // server name, unique in the supercluster
	Cluster string // its cluster: the datacenter's name
	Port    int    // client port
	GWPort  int    // gateway listen port

	opts *server.Options // the embedded server's options; nil for a process
	ext  *natsProcess    // the child process; nil when embedded

	mu  sync.Mutex // guards srv
	srv *server.Server
}

// newNATS prepares (but does not start) a server for datacenter name with
// its store under dir.
func newNATS(name, dir string) (*NATS, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	gw, err := FreePort()
	if err != nil {
		return nil, err
	}
	cl, err := FreePort()
	if err != nil {
		return nil, err
	}
	self, err := url.Parse(fmt.Sprintf("nats://127.0.0.1:%d", cl))
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "jetstream"), 0o755); err != nil {
		return nil, fmt.Errorf("nats dir: %w", err)
	}
	o := &server.Options{
		ServerName: name,
		Host:       "127.0.0.1",
		Port:       port,
		JetStream:  true,
		StoreDir:   filepath.Join(dir, "jetstream"),
		NoSigs:     true,
		NoLog:      os.Getenv("TESTENV_NATS_LOG") == "",
		// Clustered JetStream, which a supercluster needs, wants a named
		// cluster with configured routes. Each DC is a one-server cluster
		// whose only route is to itself (the server ignores it).
		Cluster: server.ClusterOpts{Name: name, Host: "127.0.0.1", Port: cl},
		Routes:  []*url.URL{self},
		Gateway: server.GatewayOpts{
			Name: name,
			Host: "127.0.0.1",
			Port: gw,
		},
		JetStreamMaxMemory: 256 << 20,
		JetStreamMaxStore:  4 << 30,
	}
	return &NATS{Name: name, Cluster: name, Port: port, GWPort: gw, opts: o}, nil
}

// setGateways points this server at the other datacenters' gateways (each
// through a Link; remotes maps a cluster to its servers' addresses) and
// advertises addr as its own gateway address.
func (n *NATS) setGateways(advertise string, remotes map[string][]string) error {
	if n.ext != nil {
		n.ext.advertise, n.ext.remotes = advertise, remotes
		return nil
	}
	n.opts.Gateway.Advertise = advertise
	n.opts.Gateway.Gateways = nil
	for name, addrs := range remotes {
		rg := &server.RemoteGatewayOpts{Name: name}
		for _, addr := range addrs {
			u, err := url.Parse("nats://" + addr)
			if err != nil {
				return fmt.Errorf("gateway url: %w", err)
			}
			rg.URLs = append(rg.URLs, u)
		}
		n.opts.Gateway.Gateways = append(n.opts.Gateway.Gateways, rg)
	}
	return nil
}

// URL is the client URL.
func (n *NATS) URL() string { return "nats://127.0.0.1:" + strconv.Itoa(n.Port) }

// Start starts the server and waits until it accepts clients.
func (n *NATS) Start() error {
	if n.ext != nil {
		return n.ext.start(n)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.srv != nil && n.srv.Running() {
		return fmt.Errorf("nats %s: already running", n.Name)
	}
	o := *n.opts
	srv, err := server.NewServer(&o)
	if err != nil {
		return fmt.Errorf("nats %s: %w", n.Name, err)
	}
	if !o.NoLog {
		srv.ConfigureLogger()
	}
	srv.Start()
	if !srv.ReadyForConnections(15 * time.Second) {
		srv.Shutdown()
		return fmt.Errorf("nats %s: not ready for connections", n.Name)
	}
	n.srv = srv
	return nil
}

// Stop shuts the server down and waits for it: SIGTERM for a process.
func (n *NATS) Stop() error {
	if n.ext != nil {
		return n.ext.p.signal(syscall.SIGTERM, 15*time.Second)
	}
	n.mu.Lock()
	srv := n.srv
	n.srv = nil
	n.mu.Unlock()
	if srv == nil {
		return ErrNotRunning
	}
	srv.Shutdown()
	srv.WaitForShutdown()
	return nil
}

// Kill sends a server process SIGKILL, as kill -9 would. For an embedded
// server it is Stop: it has no process of its own to kill.
func (n *NATS) Kill() error {
	if n.ext != nil {
		return n.ext.p.signal(syscall.SIGKILL, 5*time.Second)
	}
	return n.Stop()
}

// Running reports whether the server runs.
func (n *NATS) Running() bool {
	if n.ext != nil {
		return n.ext.p.running()
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.srv != nil && n.srv.Running()
}

// PID is the server's process id; 0 when it is embedded or not running.
func (n *NATS) PID() int {
	if n.ext != nil {
		return n.ext.p.pid()
	}
	return 0
}

// Server is the running embedded server, or nil (always nil for a server
// run as a process).
func (n *NATS) Server() *server.Server {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.srv
}

// GatewaysConnected is the number of remote gateways with an outbound
// connection from this server.
func (n *NATS) GatewaysConnected() int {
	if n.ext != nil {
		return n.ext.gatewaysConnected()
	}
	srv := n.Server()
	if srv == nil {
		return 0
	}
	return srv.NumOutboundGateways()
}

// WaitJetStream waits until the server's JetStream answers API requests,
// which in a supercluster needs an elected meta leader.
func (n *NATS) WaitJetStream(ctx context.Context) error {
	nc, err := nats.Connect(n.URL(), nats.Timeout(time.Second))
	if err != nil {
		return fmt.Errorf("nats %s: %w", n.Name, err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("nats %s: %w", n.Name, err)
	}
	for {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := js.AccountInfo(actx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nats %s: jetstream not ready: %w", n.Name, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitPlacement waits until a stream of replicas replicas can be created
// in cluster (every server there is a known, online peer), creating and
// deleting a probe stream.
func (n *NATS) waitPlacement(ctx context.Context, cluster string, replicas int) error {
	nc, err := nats.Connect(n.URL(), nats.Timeout(time.Second))
	if err != nil {
		return fmt.Errorf("nats %s: %w", n.Name, err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("nats %s: %w", n.Name, err)
	}
	name := "TESTENV_PROBE_" + cluster
	for {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := js.CreateStream(actx, jetstream.StreamConfig{Name: name, Subjects: []string{"testenv.probe." + cluster},
			Replicas: replicas, Placement: &jetstream.Placement{Cluster: cluster}, Storage: jetstream.MemoryStorage})
		if err == nil {
			err = js.DeleteStream(actx, name)
		}
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nats %s: %d replicas cannot be placed in %s: %w", n.Name, replicas, cluster, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Close stops the server if it runs (a process is killed: its store is
// about to be removed).
func (n *NATS) Close() error {
	stop := n.Stop
	if n.ext != nil {
		stop = n.Kill
	}
	if err := stop(); err != nil && !errors.Is(err, ErrNotRunning) {
		return err
	}
	return nil
}
