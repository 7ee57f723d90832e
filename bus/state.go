package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
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

// StateConfig says where a pipeline's tail state is kept: under the key
// <Pipeline>.<slot> of each location's bucket.
type StateConfig struct {
	Pipeline string // the base stream's name
	// Locations are the buckets; a save must reach the first (this
	// datacenter's, or the one bucket of the single layout) and is
	// copied to the others it can reach, so that the state outlives the
	// loss of a datacenter.
	Locations []StateLocation
}

// StateLocation is one state bucket and the cluster it is created in.
type StateLocation struct {
	Bucket    string
	Placement string
	Replicas  int // 0 means 1
}

// State is where datacenter dc keeps the tail state: the one bucket
// StateBucket in the base placement for the single layout; in the
// per-datacenter layout, StateBucket_<dc> in each datacenter, dc's first.
func (l Layout) State(dc string) StateConfig {
	b := l.base()
	sc := StateConfig{Pipeline: b.Name}
	if !l.Geo() {
		sc.Locations = []StateLocation{{Bucket: StateBucket, Placement: b.Placement, Replicas: b.Replicas}}
		return sc
	}
	sc.Locations = append(sc.Locations, StateLocation{Bucket: StateBucket + "_" + dc, Placement: dc, Replicas: b.Replicas})
	for _, o := range l.DCs {
		if o != dc {
			sc.Locations = append(sc.Locations, StateLocation{Bucket: StateBucket + "_" + o, Placement: o, Replicas: b.Replicas})
		}
	}
	return sc
}

// stateKey is the state's key: one per pipeline and slot.
func stateKey(pipeline, slot string) string {
	return strings.ReplaceAll(pipeline+"."+slot, " ", "_")
}

// stateTimeout bounds each bucket's read or write, so that an unreachable
// datacenter does not hold up the others.
const stateTimeout = 3 * time.Second

// stateBucket opens, or creates, the bucket of loc.
func stateBucket(ctx context.Context, js jetstream.JetStream, loc StateLocation) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, loc.Bucket)
	if err == nil {
		return kv, nil
	}
	if !errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, fmt.Errorf("bus: open %s: %w", loc.Bucket, err)
	}
	cfg := jetstream.KeyValueConfig{Bucket: loc.Bucket, Description: "pgcache: what each tail pipeline knows of its slot", History: 1,
		Storage: jetstream.FileStorage, Replicas: max(loc.Replicas, 1)}
	if loc.Placement != "" {
		cfg.Placement = &jetstream.Placement{Cluster: loc.Placement}
	}
	kv, err = js.CreateKeyValue(ctx, cfg)
	if errors.Is(err, jetstream.ErrBucketExists) {
		return js.KeyValue(ctx, loc.Bucket)
	}
	if err != nil {
		return nil, fmt.Errorf("bus: create %s: %w", loc.Bucket, err)
	}
	return kv, nil
}

// LoadTailState reads the state of the pipeline's slot from every
// location, and returns the latest saved; found is false when no
// location holds one. It fails only when no location answers.
func LoadTailState(ctx context.Context, js jetstream.JetStream, sc StateConfig, slot string) (st TailState, found bool, err error) {
	var errs []error
	answered := false
	for _, loc := range sc.Locations {
		lst, ok, err := loadState(ctx, js, loc, sc.Pipeline, slot)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		answered = true
		if ok && (!found || lst.Updated.After(st.Updated)) {
			st, found = lst, true
		}
	}
	if !answered {
		return st, false, errors.Join(errs...)
	}
	return st, found, nil
}

func loadState(ctx context.Context, js jetstream.JetStream, loc StateLocation, pipeline, slot string) (st TailState, found bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	kv, err := stateBucket(ctx, js, loc)
	if err != nil {
		return st, false, err
	}
	e, err := kv.Get(ctx, stateKey(pipeline, slot))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return st, false, nil
	}
	if err != nil {
		return st, false, fmt.Errorf("bus: read tail state from %s: %w", loc.Bucket, err)
	}
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return st, false, fmt.Errorf("%w: tail state in %s: %v", ErrBadMessage, loc.Bucket, err)
	}
	return st, true, nil
}

// SaveTailState writes the state of the pipeline's slot to every location
// at once. It fails when the first location's write fails; the others are
// written when they can be (the next save tries again).
func SaveTailState(ctx context.Context, js jetstream.JetStream, sc StateConfig, st TailState) error {
	st.Updated = time.Now().UTC()
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	errs := make([]error, len(sc.Locations))
	var wg sync.WaitGroup
	for i, loc := range sc.Locations {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(ctx, stateTimeout)
			defer cancel()
			kv, err := stateBucket(ctx, js, loc)
			if err == nil {
				_, err = kv.Put(ctx, stateKey(sc.Pipeline, st.Slot), data)
			}
			if err != nil {
				errs[i] = fmt.Errorf("bus: save tail state in %s: %w", loc.Bucket, err)
			}
		}()
	}
	wg.Wait()
	if len(errs) == 0 {
		return errors.New("bus: no location to save the tail state")
	}
	return errs[0]
}
