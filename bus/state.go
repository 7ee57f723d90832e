package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// StateBucket is the JetStream key-value bucket where tail processes keep
// what they know of their slot, beside the stream.
const StateBucket = "PGCACHE_TAIL"

// TailState is what the tail role keeps of a pipeline (a slot streaming
// into a stream) so that a later process knows this pipeline ran before:
// a slot found missing then means it was lost, not that this is the first
// start.
type TailState struct {
	Slot string `json:"slot"`
	// SystemID is the database cluster's system identifier.
	SystemID string `json:"system_id"`
	// Timeline is the primary's timeline when last saved.
	Timeline uint32 `json:"timeline,omitempty"`
	// ConfirmedLSN is the slot's confirmed position when last saved.
	ConfirmedLSN uint64 `json:"confirmed_lsn"`
	// Flushes counts the pools flushes announced after a slot loss.
	Flushes int       `json:"flushes,omitempty"`
	Updated time.Time `json:"updated"`
}

// stateKey is the state's key: one per stream and slot.
func stateKey(stream, slot string) string {
	return strings.ReplaceAll(stream+"."+slot, " ", "_")
}

// stateBucket opens, or creates, the state bucket in placement's cluster.
func stateBucket(ctx context.Context, js jetstream.JetStream, placement string) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, StateBucket)
	if err == nil {
		return kv, nil
	}
	if !errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, fmt.Errorf("bus: open %s: %w", StateBucket, err)
	}
	cfg := jetstream.KeyValueConfig{Bucket: StateBucket, Description: "pgcache: what each tail pipeline knows of its slot", History: 1, Storage: jetstream.FileStorage}
	if placement != "" {
		cfg.Placement = &jetstream.Placement{Cluster: placement}
	}
	kv, err = js.CreateKeyValue(ctx, cfg)
	if errors.Is(err, jetstream.ErrBucketExists) {
		return js.KeyValue(ctx, StateBucket)
	}
	if err != nil {
		return nil, fmt.Errorf("bus: create %s: %w", StateBucket, err)
	}
	return kv, nil
}

// LoadTailState reads the state of stream and slot; found is false when
// this pipeline never saved one.
func LoadTailState(ctx context.Context, js jetstream.JetStream, placement, stream, slot string) (st TailState, found bool, err error) {
	kv, err := stateBucket(ctx, js, placement)
	if err != nil {
		return st, false, err
	}
	e, err := kv.Get(ctx, stateKey(stream, slot))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return st, false, nil
	}
	if err != nil {
		return st, false, fmt.Errorf("bus: read tail state: %w", err)
	}
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return st, false, fmt.Errorf("%w: tail state: %v", ErrBadMessage, err)
	}
	return st, true, nil
}

// SaveTailState writes the state of stream and slot.
func SaveTailState(ctx context.Context, js jetstream.JetStream, placement, stream string, st TailState) error {
	kv, err := stateBucket(ctx, js, placement)
	if err != nil {
		return err
	}
	st.Updated = time.Now().UTC()
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if _, err := kv.Put(ctx, stateKey(stream, st.Slot), data); err != nil {
		return fmt.Errorf("bus: save tail state: %w", err)
	}
	return nil
}
