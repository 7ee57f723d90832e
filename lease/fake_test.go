package lease

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pgcache/pgcache/mcpool"
)

// fakeBackend is an in-memory Backend that behaves as memcached 1.6.18's
// meta commands do for the flags the proxy uses (mg v f c s k N T, ms
// C F T M I c, md C I T q, ma D N J MD v), lease flags W, Z and X included.
// Time does not pass: items never expire. err, when set, fails every
// request.
type fakeBackend struct {
	mu    sync.Mutex // guards items, cas, err, calls
	items map[string]*fakeItem
	cas   uint64
	err   error
	calls int
	gets  map[string]int // MetaGet calls per key
	// getHook, when set, runs at the start of every MetaGet, outside mu
	// (a test blocks a read in flight with it). Set before use.
	getHook func(key string)
}

type fakeItem struct {
	value      []byte
	flags      uint32
	cas        uint64
	stale      bool
	tokenSent  bool
	exptimeSet int64
}

func newFakeBackend() *fakeBackend { return &fakeBackend{items: map[string]*fakeItem{}} }

func (f *fakeBackend) nextCAS() uint64 { f.cas++; return f.cas }

func (f *fakeBackend) begin() error {
	f.mu.Lock()
	f.calls++
	return f.err
}

func flagArg(flags []string, c byte) (string, bool) {
	for _, fl := range flags {
		if len(fl) > 0 && fl[0] == c {
			return fl[1:], true
		}
	}
	return "", false
}

func (f *fakeBackend) MetaGet(_ context.Context, key string, flags ...string) (mcpool.Response, error) {
	if f.getHook != nil {
		f.getHook(key)
	}
	if err := f.begin(); err != nil {
		f.mu.Unlock()
		return mcpool.Response{}, err
	}
	defer f.mu.Unlock()
	if f.gets == nil {
		f.gets = map[string]int{}
	}
	f.gets[key]++
	it := f.items[key]
	won := false
	if it == nil {
		n, ok := flagArg(flags, 'N')
		if !ok {
			return mcpool.Response{Status: mcpool.StatusEN}, nil
		}
		ttl, _ := strconv.ParseInt(n, 10, 64)
		it = &fakeItem{cas: f.nextCAS(), exptimeSet: ttl}
		f.items[key] = it
		won = true
	} else if t, ok := flagArg(flags, 'T'); ok {
		it.exptimeSet, _ = strconv.ParseInt(t, 10, 64)
	}
	r := mcpool.Response{Status: mcpool.StatusHD}
	var out []string
	for _, fl := range flags {
		switch fl[0] {
		case 'v':
			r.Status = mcpool.StatusVA
			r.Value = bytes.Clone(it.value)
		case 'f':
			r.ClientFlags = it.flags
			out = append(out, "f"+strconv.FormatUint(uint64(it.flags), 10))
		case 'c':
			r.CAS = it.cas
			out = append(out, "c"+strconv.FormatUint(it.cas, 10))
		case 's':
			r.Size = int64(len(it.value))
			out = append(out, "s"+strconv.Itoa(len(it.value)))
		case 't':
			r.TTL = it.exptimeSet
			if r.TTL == 0 {
				r.TTL = -1
			}
		case 'k':
			r.Key = key
			out = append(out, "k"+key)
		}
	}
	if it.tokenSent {
		r.Claimed = true
		out = append(out, "Z")
	}
	if it.stale {
		r.Stale = true
		out = append(out, "X")
		if !it.tokenSent {
			won = true
		}
	}
	if won {
		r.Win = true
		out = append(out, "W")
		it.tokenSent = true
	}
	r.Flags = strings.Join(out, " ")
	return r, nil
}

func (f *fakeBackend) MetaSet(_ context.Context, key string, value []byte, opt mcpool.SetOptions) (mcpool.Response, error) {
	if err := f.begin(); err != nil {
		f.mu.Unlock()
		return mcpool.Response{}, err
	}
	defer f.mu.Unlock()
	it := f.items[key]
	if opt.CAS != 0 {
		switch {
		case it == nil:
			return mcpool.Response{Status: mcpool.StatusNF}, nil
		case it.cas != opt.CAS:
			return mcpool.Response{Status: mcpool.StatusEX}, nil
		}
	}
	switch opt.Mode {
	case 'E':
		if it != nil {
			return mcpool.Response{Status: mcpool.StatusNS}, nil
		}
	case 'R', 'A', 'P':
		if it == nil {
			return mcpool.Response{Status: mcpool.StatusNS}, nil
		}
	}
	nv := bytes.Clone(value)
	flags := opt.ClientFlags
	switch opt.Mode {
	case 'A':
		nv, flags = append(bytes.Clone(it.value), value...), it.flags
	case 'P':
		nv, flags = append(bytes.Clone(value), it.value...), it.flags
	}
	n := &fakeItem{value: nv, flags: flags, cas: f.nextCAS()}
	if t, ok := flagArg(opt.Flags, 'T'); ok {
		n.exptimeSet, _ = strconv.ParseInt(t, 10, 64)
	}
	f.items[key] = n
	r := mcpool.Response{Status: mcpool.StatusHD}
	if opt.ReturnCAS {
		r.CAS = n.cas
	}
	return r, nil
}

func (f *fakeBackend) MetaDelete(_ context.Context, key string, opt mcpool.DeleteOptions) (mcpool.Response, error) {
	if err := f.begin(); err != nil {
		f.mu.Unlock()
		return mcpool.Response{}, err
	}
	defer f.mu.Unlock()
	it := f.items[key]
	switch {
	case it == nil:
		return mcpool.Response{Status: mcpool.StatusNF}, nil
	case opt.CAS != 0 && it.cas != opt.CAS:
		return mcpool.Response{Status: mcpool.StatusEX}, nil
	case opt.Invalidate:
		it.stale, it.tokenSent, it.cas = true, false, f.nextCAS()
	default:
		delete(f.items, key)
	}
	return mcpool.Response{Status: mcpool.StatusHD, Quiet: opt.Quiet}, nil
}

func (f *fakeBackend) MetaArithmetic(_ context.Context, key string, opt mcpool.ArithmeticOptions) (mcpool.Response, error) {
	if err := f.begin(); err != nil {
		f.mu.Unlock()
		return mcpool.Response{}, err
	}
	defer f.mu.Unlock()
	it := f.items[key]
	if it == nil {
		return mcpool.Response{Status: mcpool.StatusNF}, nil
	}
	n, err := strconv.ParseUint(string(it.value), 10, 64)
	if err != nil {
		return mcpool.Response{}, &mcpool.ServerError{Kind: "CLIENT_ERROR", Msg: "cannot increment or decrement non-numeric value"}
	}
	d := opt.Delta
	if _, ok := flagArg(opt.Flags, 'D'); !ok && d == 0 {
		d = 1
	}
	if opt.Decrement {
		n -= min(n, d)
	} else {
		n += d
	}
	it.value = strconv.AppendUint(nil, n, 10)
	it.cas = f.nextCAS()
	return mcpool.Response{Status: mcpool.StatusVA, Value: bytes.Clone(it.value)}, nil
}

// Do forwards mg, md and ma lines to the typed methods (enough for the
// tests); ms is stored with its value.
func (f *fakeBackend) Do(ctx context.Context, request, value []byte) (mcpool.Response, error) {
	toks := strings.Fields(string(request))
	if len(toks) < 2 {
		return mcpool.Response{}, mcpool.ErrBadRequest
	}
	switch toks[0] {
	case "mg":
		return f.MetaGet(ctx, toks[1], toks[2:]...)
	case "ms":
		return f.MetaSet(ctx, toks[1], value, mcpool.SetOptions{})
	case "md":
		return f.MetaDelete(ctx, toks[1], mcpool.DeleteOptions{})
	}
	return mcpool.Response{}, mcpool.ErrBadRequest
}

func (f *fakeBackend) FlushAll(context.Context, int64) error {
	if err := f.begin(); err != nil {
		f.mu.Unlock()
		return err
	}
	defer f.mu.Unlock()
	clear(f.items)
	return nil
}

func (f *fakeBackend) Pick(string) int { return 0 }

// The fake is one server: the On requests go where the plain ones do.
func (f *fakeBackend) MetaGetOn(ctx context.Context, _ int, key string, flags ...string) (mcpool.Response, error) {
	return f.MetaGet(ctx, key, flags...)
}

func (f *fakeBackend) MetaSetOn(ctx context.Context, _ int, key string, value []byte, opt mcpool.SetOptions) (mcpool.Response, error) {
	return f.MetaSet(ctx, key, value, opt)
}

func (f *fakeBackend) MetaDeleteOn(ctx context.Context, _ int, key string, opt mcpool.DeleteOptions) (mcpool.Response, error) {
	return f.MetaDelete(ctx, key, opt)
}

// markStale is the purger's md I.
func (f *fakeBackend) markStale(key string) {
	_, _ = f.MetaDelete(context.Background(), key, mcpool.DeleteOptions{Invalidate: true})
}

// getCount is the number of successful MetaGet calls of key so far.
func (f *fakeBackend) getCount(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gets[key]
}

func (f *fakeBackend) setErr(err error) {
	f.mu.Lock()
	f.err = err
	f.mu.Unlock()
}

// fakeConfig is a config for unit tests on the fake.
func fakeConfig() Config {
	cfg := DefaultConfig()
	cfg.Lease.TTL = time.Hour // the fake never expires items; records must not either
	cfg.Lease.Wait = time.Minute
	cfg.Lease.PollMin = time.Millisecond
	cfg.Lease.PollMax = 2 * time.Millisecond
	return cfg
}
