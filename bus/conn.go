package bus

import (
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// ErrConnConfig: the connection settings are unusable (a bad nkey file).
var ErrConnConfig = errors.New("bus: bad connection settings")

// ConnConfig says how to reach JetStream.
type ConnConfig struct {
	// URL of the NATS servers; empty starts an embedded single-node
	// server with JetStream, its data under DataDir/nats.
	URL     string
	DataDir string
	// Name is the client name (and the embedded server's).
	Name string
	// Creds is a credentials file; NKey an nkey seed file (at most one).
	Creds, NKey string
	// CA verifies the server; Cert and Key authenticate the client.
	CA, Cert, Key string
}

// Conn is a connection to JetStream. Close it once.
type Conn struct {
	nc       *nats.Conn
	js       jetstream.JetStream
	shutdown func()
}

// JetStream returns the connection's JetStream context.
func (c *Conn) JetStream() jetstream.JetStream { return c.js }

// Close closes the connection, then the embedded server if any.
func (c *Conn) Close() {
	c.nc.Close()
	c.shutdown()
}

// Connect connects to cfg.URL, or starts an embedded server when it is
// empty. It reconnects forever in the background, so a NATS server that
// is down at start or restarts later is waited for, not fatal.
func Connect(cfg ConnConfig, log *zap.Logger) (*Conn, error) {
	url := cfg.URL
	stop := func() {}
	if url == "" {
		o := &server.Options{
			ServerName: cfg.Name, Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true,
			StoreDir: filepath.Join(cfg.DataDir, "nats"), NoSigs: true, NoLog: true,
		}
		s, err := server.NewServer(o)
		if err != nil {
			return nil, fmt.Errorf("embedded nats: %w", err)
		}
		s.Start()
		if !s.ReadyForConnections(10 * time.Second) {
			s.Shutdown()
			return nil, errors.New("embedded nats: not ready")
		}
		url = s.ClientURL()
		stop = func() { s.Shutdown(); s.WaitForShutdown() }
		log.Info("embedded NATS server started", zap.String("store", o.StoreDir))
	}
	opts := []nats.Option{
		nats.Name(cfg.Name), nats.MaxReconnects(-1), nats.ReconnectWait(250 * time.Millisecond), nats.RetryOnFailedConnect(true),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("disconnected", zap.Error(err)) }),
		nats.ReconnectHandler(func(*nats.Conn) { log.Info("reconnected") }),
	}
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	if cfg.NKey != "" {
		o, err := nats.NkeyOptionFromSeed(cfg.NKey)
		if err != nil {
			stop()
			return nil, fmt.Errorf("%w: nkey: %w", ErrConnConfig, err)
		}
		opts = append(opts, o)
	}
	if cfg.CA != "" {
		opts = append(opts, nats.RootCAs(cfg.CA))
	}
	if cfg.Cert != "" {
		opts = append(opts, nats.ClientCert(cfg.Cert, cfg.Key))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		stop()
		return nil, fmt.Errorf("connect to nats: %w", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		stop()
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	return &Conn{nc: nc, js: js, shutdown: stop}, nil
}
