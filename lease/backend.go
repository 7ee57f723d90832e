package lease

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/pgcache/pgcache/mcpool"
)

// Backend is the memcached pool the proxy talks to in the meta protocol,
// each request routed to the server that owns its key. *mcpool.Pool has
// all but FlushAll; NewPoolBackend adds it. Implementations are safe for
// concurrent use, apply a default deadline when ctx has none, and report
// memcached's error lines as *mcpool.ServerError. The Backend outlives
// the Server: the caller closes it after the Server is done.
type Backend interface {
	// MetaGet sends "mg <key> <flags...>".
	MetaGet(ctx context.Context, key string, flags ...string) (mcpool.Response, error)
	// MetaSet sends "ms <key> <len> <flags...>" and the value.
	MetaSet(ctx context.Context, key string, value []byte, opt mcpool.SetOptions) (mcpool.Response, error)
	// MetaDelete sends "md <key> <flags...>".
	MetaDelete(ctx context.Context, key string, opt mcpool.DeleteOptions) (mcpool.Response, error)
	// MetaArithmetic sends "ma <key> v <flags...>".
	MetaArithmetic(ctx context.Context, key string, opt mcpool.ArithmeticOptions) (mcpool.Response, error)
	// Do forwards one meta command line (mg, ms, md, ma, me) as written,
	// value being the data block of an ms. A q flag yields a Response
	// with Quiet set.
	Do(ctx context.Context, request, value []byte) (mcpool.Response, error)
	// FlushAll sends "flush_all [delay]" to every server.
	FlushAll(ctx context.Context, delay int64) error
	// Pick returns the index of the server that holds key.
	Pick(key string) int
	// MetaGetOn, MetaSetOn and MetaDeleteOn send their request to server
	// i (from Pick), wherever key would go: lease records sit on their
	// key's server.
	MetaGetOn(ctx context.Context, i int, key string, flags ...string) (mcpool.Response, error)
	MetaSetOn(ctx context.Context, i int, key string, value []byte, opt mcpool.SetOptions) (mcpool.Response, error)
	MetaDeleteOn(ctx context.Context, i int, key string, opt mcpool.DeleteOptions) (mcpool.Response, error)
}

// PoolBackend is a Backend on an *mcpool.Pool. mcpool speaks only the meta
// protocol, which has no flush: FlushAll opens a short text-protocol
// connection to each server of the pool's ring.
type PoolBackend struct {
	*mcpool.Pool
}

// NewPoolBackend returns p as a Backend.
func NewPoolBackend(p *mcpool.Pool) *PoolBackend { return &PoolBackend{Pool: p} }

// FlushAll sends "flush_all <delay>" to every server of the ring, in
// parallel, and returns the errors of those that did not answer OK.
func (b *PoolBackend) FlushAll(ctx context.Context, delay int64) error {
	ring := b.Ring()
	errs := make([]error, ring.Len())
	done := make(chan struct{})
	for i := 0; i < ring.Len(); i++ {
		go func(i int) {
			defer func() { done <- struct{}{} }()
			addr := ring.Server(i).Addr
			if err := flushServer(ctx, addr, delay); err != nil {
				errs[i] = fmt.Errorf("flush_all %s: %w", addr, err)
			}
		}(i)
	}
	for i := 0; i < ring.Len(); i++ {
		<-done
	}
	return errors.Join(errs...)
}

func flushServer(ctx context.Context, addr string, delay int64) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("%w: %w", mcpool.ErrServerDown, err)
	}
	defer nc.Close()
	dl, _ := ctx.Deadline()
	_ = nc.SetDeadline(dl)
	if _, err := nc.Write([]byte("flush_all " + strconv.FormatInt(delay, 10) + "\r\n")); err != nil {
		return fmt.Errorf("%w: %w", mcpool.ErrServerDown, err)
	}
	line, err := bufio.NewReaderSize(nc, 256).ReadString('\n')
	if err != nil {
		return fmt.Errorf("%w: %w", mcpool.ErrServerDown, err)
	}
	if line = strings.TrimRight(line, "\r\n"); line != "OK" {
		return fmt.Errorf("%w: answered %q", mcpool.ErrProtocol, line)
	}
	return nil
}
