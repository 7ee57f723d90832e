package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
)

// sourceHeader is set by JetStream on every message a stream copied from
// another: "<stream> <sequence> ...", the sequence in the stream it came from.
const sourceHeader = "Nats-Stream-Source"

// copies follows how far other datacenters' streams have copied this
// publisher's stream (the per-datacenter Layout). For each remote stream
// it keeps the highest sequence of the local stream the remote holds,
// read from the headers of the copies (an ordered consumer with headers
// only, filtered to the local subject). A batch is durable in enough
// datacenters once need remotes hold its sequence.
type copies struct {
	js      jetstream.JetStream
	local   string // the local stream's name
	subject string // the local subject, which the remotes copy
	remotes []StreamConfig
	need    int
	log     *zap.Logger

	mu      sync.Mutex // guards held, changed
	held    []uint64   // per remote: the highest local sequence it holds
	changed chan struct{}
}

func newCopies(js jetstream.JetStream, local StreamConfig, remotes []StreamConfig, need int, log *zap.Logger) *copies {
	return &copies{js: js, local: local.Name, subject: local.Subject, remotes: remotes, need: need, log: log,
		held: make([]uint64, len(remotes)), changed: make(chan struct{})}
}

// run follows every remote until ctx ends.
func (c *copies) run(ctx context.Context) {
	var wg sync.WaitGroup
	for i := range c.remotes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.follow(ctx, i)
		}()
	}
	wg.Wait()
}

// follow keeps an ordered consumer on remote i, creating the remote
// stream in its cluster when it is missing, and starting again after any
// failure (the remote's cluster unreachable, the stream recreated).
func (c *copies) follow(ctx context.Context, i int) {
	r := c.remotes[i]
	log := c.log.With(zap.String("remote_stream", r.Name))
	for attempt := 0; ctx.Err() == nil; attempt++ {
		err := c.consume(ctx, i)
		if ctx.Err() != nil {
			return
		}
		d := retry.Delay(attempt)
		if attempt%10 == 0 {
			log.Warn("cannot follow a remote datacenter's copy of the stream; confirmations wait for it", zap.Error(err), zap.Duration("retry_in", d))
		}
		if backoff.Wait(ctx, d) != nil {
			return
		}
	}
}

// consume runs one ordered consumer on remote i until it closes or ctx ends.
func (c *copies) consume(ctx context.Context, i int) error {
	r := c.remotes[i]
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := EnsureStream(sctx, c.js, r)
	if err != nil {
		cancel()
		return err
	}
	cons, err := c.js.OrderedConsumer(sctx, r.Name, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{c.subject},
		DeliverPolicy:  jetstream.DeliverLastPolicy,
		HeadersOnly:    true,
	})
	cancel()
	if err != nil {
		return fmt.Errorf("follow %s: %w", r.Name, err)
	}
	var last error
	var mu sync.Mutex
	cc, err := cons.Consume(func(m jetstream.Msg) {
		if seq, ok := c.sourceSeq(m.Headers().Get(sourceHeader)); ok {
			c.advance(i, seq)
		}
	}, jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		mu.Lock()
		last = err
		mu.Unlock()
	}))
	if err != nil {
		return fmt.Errorf("follow %s: %w", r.Name, err)
	}
	select {
	case <-ctx.Done():
		cc.Stop()
		return ctx.Err()
	case <-cc.Closed():
		mu.Lock()
		defer mu.Unlock()
		return fmt.Errorf("follow %s: consumer closed: %w", r.Name, errors.Join(last, errors.New("closed")))
	}
}

// sourceSeq reads the local sequence from a copy's source header.
func (c *copies) sourceSeq(h string) (uint64, bool) {
	name, rest, ok := strings.Cut(h, " ")
	if !ok {
		return 0, false
	}
	name, _, _ = strings.Cut(name, ":") // a stream of another account or domain
	if name != c.local {
		return 0, false
	}
	num, _, _ := strings.Cut(rest, " ")
	seq, err := strconv.ParseUint(num, 10, 64)
	return seq, err == nil
}

func (c *copies) advance(i int, seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if seq <= c.held[i] {
		return
	}
	c.held[i] = seq
	close(c.changed)
	c.changed = make(chan struct{})
}

// covered is the highest local sequence that need remotes hold. Called
// with c.mu held.
func (c *copies) covered() uint64 {
	if c.need <= 0 {
		return ^uint64(0)
	}
	h := slices.Clone(c.held)
	slices.Sort(h)
	return h[len(h)-c.need]
}

// wait returns once need remotes hold local sequence seq, or ctx ends.
func (c *copies) wait(ctx context.Context, seq uint64) error {
	for {
		c.mu.Lock()
		ok, ch := c.covered() >= seq, c.changed
		c.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// behind is how many local sequences up to last the remotes still lack
// (for the need-th remote).
func (c *copies) behind(last uint64) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cv := c.covered(); cv < last {
		return last - cv
	}
	return 0
}
