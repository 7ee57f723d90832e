package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
)

// ConsumerConfig names one datacenter's durable consumer.
type ConsumerConfig struct {
	Stream string // stream name; default INVALIDATIONS
	DC     string // the consumer is "purge-<dc>"
	// MaxAckPending bounds the messages delivered but not yet acked: the
	// purger's in-flight window. 0 means 4096.
	MaxAckPending int
	// AckWait is how long a delivered message may go without an ack or a
	// progress signal before it is redelivered. 0 means 30s.
	AckWait time.Duration
	// MaxBuffered bounds the bytes of messages pulled and not yet handed
	// to the handler. 0 means 2 MiB; it is raised to twice the server's
	// max payload, so that the largest message always fits.
	MaxBuffered int
	// MaxBufferedMsgs bounds the messages pulled and not yet handed to
	// the handler, beside MaxBuffered. 0 means 1024. (The client keeps a
	// channel of this many slots: left unset, with a bytes limit alone,
	// it would make one of a million, 8 MB, per consumer.)
	MaxBufferedMsgs int
}

func (c *ConsumerConfig) defaults() {
	if c.Stream == "" {
		c.Stream = "INVALIDATIONS"
	}
	if c.MaxAckPending == 0 {
		c.MaxAckPending = 4096
	}
	if c.AckWait == 0 {
		c.AckWait = 30 * time.Second
	}
	if c.MaxBuffered == 0 {
		c.MaxBuffered = 2 << 20
	}
	if c.MaxBufferedMsgs == 0 {
		c.MaxBufferedMsgs = 1024
	}
}

// Durable is the consumer name of a datacenter.
func (c ConsumerConfig) Durable() string { return "purge-" + c.DC }

// Delivery is one delivered batch. The handler owns it: it must call
// exactly one of Ack (every key applied), Nak (deliver again later) or Term
// (never deliver again), and may call InProgress while it works.
type Delivery struct {
	Batch     *Batch
	Seq       uint64 // stream sequence
	Delivered uint64 // 1 on first delivery
	// Stored is when the stream stored the message (its JetStream
	// timestamp); Received is when this consumer decoded it. With the
	// batch's CommitTime they split commit-to-purge into its stages.
	Stored, Received time.Time
	msg              jetstream.Msg
}

// Ack acknowledges the batch and waits for the server to confirm it.
func (d *Delivery) Ack(ctx context.Context) error { return d.msg.DoubleAck(ctx) }

// Nak asks for redelivery after delay.
func (d *Delivery) Nak(delay time.Duration) error { return d.msg.NakWithDelay(delay) }

// InProgress resets the redelivery timer.
func (d *Delivery) InProgress() error { return d.msg.InProgress() }

// Consumer delivers one datacenter's batches from the stream.
type Consumer struct {
	js  jetstream.JetStream
	cfg ConsumerConfig
	log *zap.Logger
	// BadMessages counts messages that could not be decoded (terminated).
	onBad func(error)
}

// NewConsumer returns a consumer; Run creates the durable when missing.
// onBad is called for every undecodable message, which is terminated.
func NewConsumer(js jetstream.JetStream, cfg ConsumerConfig, log *zap.Logger, onBad func(error)) (*Consumer, error) {
	cfg.defaults()
	if cfg.DC == "" {
		return nil, errors.New("bus: consumer dc is empty")
	}
	if onBad == nil {
		onBad = func(error) {}
	}
	return &Consumer{js: js, cfg: cfg, log: log, onBad: onBad}, nil
}

// Run delivers batches to handle, one call at a time; handle may hand the
// Delivery to another goroutine and return, and blocks to apply
// backpressure. Run waits for the stream and the durable (retrying while
// NATS or the stream is unavailable) and returns nil when ctx ends.
func (c *Consumer) Run(ctx context.Context, handle func(*Delivery)) error {
	for attempt := 0; ; attempt++ {
		err := c.consume(ctx, handle)
		if ctx.Err() != nil {
			return nil
		}
		d := retry.Delay(attempt)
		c.log.Warn("consumer interrupted; retrying", zap.String("durable", c.cfg.Durable()), zap.Error(err), zap.Duration("retry_in", d))
		if backoff.Wait(ctx, d) != nil {
			return nil
		}
	}
}

func (c *Consumer) consume(ctx context.Context, handle func(*Delivery)) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	cons, err := c.js.CreateOrUpdateConsumer(cctx, c.cfg.Stream, jetstream.ConsumerConfig{
		Durable:       c.cfg.Durable(),
		Description:   "pgcache purge for " + c.cfg.DC,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       c.cfg.AckWait,
		MaxAckPending: c.cfg.MaxAckPending,
		MaxDeliver:    -1,
	})
	if err != nil {
		// Creating or updating needs JetStream's meta leader, which a
		// supercluster that lost half its servers (one of two
		// datacenters) no longer has; the durable itself still works
		// on its stream's servers: bind to it as it is.
		if existing, berr := c.js.Consumer(cctx, c.cfg.Stream, c.cfg.Durable()); berr == nil {
			c.log.Warn("cannot create or update the durable consumer; using it as it is", zap.String("durable", c.cfg.Durable()), zap.Error(err))
			cons, err = existing, nil
		}
	}
	cancel()
	if err != nil {
		return fmt.Errorf("create consumer %s on %s: %w", c.cfg.Durable(), c.cfg.Stream, err)
	}
	buffered := c.cfg.MaxBuffered
	if nc := c.js.Conn(); nc != nil {
		buffered = max(buffered, 2*int(nc.MaxPayload()))
	}
	// Bounded in bytes, not only messages: 256 messages of up to the max
	// payload each could hold 256 MB.
	it, err := cons.Messages(jetstream.PullMaxMessagesWithBytesLimit(c.cfg.MaxBufferedMsgs, buffered), jetstream.PullExpiry(5*time.Second))
	if err != nil {
		return fmt.Errorf("consume %s: %w", c.cfg.Durable(), err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
	for {
		m, err := it.Next()
		if err != nil {
			return fmt.Errorf("next message: %w", err)
		}
		meta, err := m.Metadata()
		if err != nil {
			c.onBad(err)
			_ = m.Term()
			continue
		}
		b, err := decodeInPlace(m.Data())
		if err != nil {
			c.log.Error("undecodable invalidation batch terminated", zap.Uint64("seq", meta.Sequence.Stream), zap.Error(err))
			c.onBad(err)
			_ = m.TermWithReason(err.Error())
			continue
		}
		handle(&Delivery{Batch: b, Seq: meta.Sequence.Stream, Delivered: meta.NumDelivered, Stored: meta.Timestamp, Received: time.Now(), msg: m})
	}
}

// wireBatch reads a Batch with its keys left raw (the outer Keys hides
// Batch's).
type wireBatch struct {
	Batch
	Keys json.RawMessage `json:"keys"`
}

// decodeInPlace is Decode (the same result and errors) with the keys
// read in place: they are strings over one copy of the message's key
// array, not one allocation each in a slice grown by doubling. A batch
// of 1,000 ten-byte keys held 40-60 bytes a key that way, 16 (the
// string header) plus the shared bytes this way; the purger holds every
// batch it works on, so its in-flight memory is mostly keys. A key with
// an escape or a byte outside printable ASCII is decoded by encoding/json
// alone, as Decode would.
func decodeInPlace(data []byte) (*Batch, error) {
	var w wireBatch
	if err := json.Unmarshal(data, &w); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadMessage, err)
	}
	b := &w.Batch
	if b.V < 1 || b.V > Version {
		return nil, fmt.Errorf("%w: version %d (this build reads 1..%d)", ErrBadMessage, b.V, Version)
	}
	if b.CommitLSN == 0 {
		return nil, fmt.Errorf("%w: no commit_lsn", ErrBadMessage)
	}
	keys, err := rawKeys(w.Keys)
	if err != nil {
		return nil, fmt.Errorf("%w: keys: %v", ErrBadMessage, err)
	}
	b.Keys = keys
	return b, nil
}

// rawKeys reads a JSON array of strings (or null) that json.Unmarshal has
// already checked as valid JSON. raw must not change afterwards: the
// keys share its bytes.
func rawKeys(raw json.RawMessage) ([]string, error) {
	i := skipSpace(raw, 0)
	if i >= len(raw) || raw[i] == 'n' {
		return nil, nil // absent or null, as json.Unmarshal leaves it
	}
	if raw[i] != '[' {
		return nil, errors.New("not an array")
	}
	// Count the strings first, so the slice is made once at its size:
	// every key is a string, and a string's quotes are its only
	// unescaped ones.
	n := 0
	for j := i + 1; j < len(raw); j++ {
		switch raw[j] {
		case '\\':
			j++
		case '"':
			n++
		}
	}
	keys := make([]string, 0, n/2)
	i = skipSpace(raw, i+1)
	for i < len(raw) && raw[i] != ']' {
		if raw[i] == ',' {
			i = skipSpace(raw, i+1)
			continue
		}
		if raw[i] == 'n' && len(raw) >= i+4 && string(raw[i:i+4]) == "null" {
			keys = append(keys, "") // as json.Unmarshal reads a null string
			i = skipSpace(raw, i+4)
			continue
		}
		if raw[i] != '"' {
			return nil, errors.New("not an array of strings")
		}
		end, plain := i+1, true
		for ; end < len(raw) && raw[end] != '"'; end++ {
			c := raw[end]
			if c == '\\' {
				plain = false
				end++
			} else if c < 0x20 || c >= utf8.RuneSelf {
				plain = false
			}
		}
		if end >= len(raw) {
			return nil, errors.New("unterminated string")
		}
		if plain {
			if end == i+1 {
				keys = append(keys, "")
			} else {
				keys = append(keys, unsafe.String(&raw[i+1], end-i-1))
			}
		} else {
			var k string
			if err := json.Unmarshal(raw[i:end+1], &k); err != nil {
				return nil, err
			}
			keys = append(keys, k)
		}
		i = skipSpace(raw, end+1)
	}
	return keys, nil
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}
