package lease

import (
	"context"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgcache/pgcache/mcpool"
)

// exec runs one parsed command and queues its reply. It reports whether
// the connection is to be closed (quit).
func (c *conn) exec(ctx context.Context, cmd *Command, value []byte) (quit bool) {
	s := c.s
	b := c.out[:0]
	switch {
	case cmd.Op.IsRetrieval():
		b = c.retrieve(ctx, b, cmd)
	case cmd.Op.IsStorage():
		s.st.cmdSet.Add(1)
		b = c.store(ctx, b, cmd, value)
	case cmd.Op.IsMeta():
		s.st.cmdMeta.Add(1)
		b = c.meta(ctx, b, cmd, value)
	default:
		switch cmd.Op {
		case OpDelete:
			s.st.cmdDelete.Add(1)
			b = c.delete(ctx, b, cmd.Keys[0])
		case OpIncr, OpDecr:
			s.st.cmdArith.Add(1)
			b = c.arith(ctx, b, cmd)
		case OpTouch:
			s.st.cmdTouch.Add(1)
			ok, err := c.touch(ctx, cmd.Keys[0], cmd.Exptime)
			switch {
			case err != nil:
				b = c.backendError(b, err)
			case ok:
				b = append(b, rTouched...)
			default:
				b = append(b, rNotFound...)
			}
		case OpVersion:
			b = appendLine(b, "VERSION "+s.cfg.Version)
		case OpStats:
			if len(cmd.Args) > 0 {
				b = appendLine(b, replyError)
				break
			}
			b = c.stats(b)
		case OpFlushAll:
			s.st.cmdFlush.Add(1)
			if s.cfg.FlushAll != FlushForward {
				b = appendLine(b, replyFlushRefused)
				break
			}
			err := s.be.FlushAll(ctx, cmd.Exptime)
			// Even a partial flush may have dropped lease items and
			// records: forget the leases (their fills are then checked
			// against what memcached holds).
			s.l.flushed()
			if err != nil {
				b = c.backendError(b, err)
				break
			}
			b = append(b, rOK...)
		case OpVerbosity:
			b = append(b, rOK...)
		case OpQuit:
			return true
		}
	}
	if writes(cmd.Op) && len(cmd.Keys) > 0 {
		s.l.wrote(cmd.Keys[0])
	}
	if !cmd.NoReply {
		c.write(b)
	}
	c.out = b[:0]
	if cap(c.out) > 64<<10 {
		c.out = nil // a large reply (a meta command's value): not kept
	}
	return false
}

// writes reports whether op may change its key's item (touch and gat do
// not change the value).
func writes(op Op) bool {
	switch op {
	case OpDelete, OpIncr, OpDecr, OpMetaSet, OpMetaDelete, OpMetaArith:
		return true
	}
	return op.IsStorage()
}

// itemState is what a key holds, as clients see it.
type itemState uint8

const (
	stateAbsent  itemState = iota // no item
	stateLeased                   // only the empty item of a lease: absent to clients
	statePresent                  // a value (fresh or stale)
)

// probe finds out whether key holds a value, for the commands that act on
// an existing item only (delete, replace, append, prepend, incr, decr):
// the empty item of an outstanding lease must look absent to them. With
// leases off every item is a value and no probe is sent. A stale item's
// refill token that the probe took (memcached gives W to the first mg of
// a stale item) is handed back at once.
func (c *conn) probe(ctx context.Context, key string) (itemState, error) {
	if !c.s.l.enabled() {
		return statePresent, nil
	}
	resp, err := c.s.be.MetaGet(ctx, key, "s", "f", "c")
	if err != nil {
		return 0, err
	}
	if resp.Status != mcpool.StatusHD {
		return stateAbsent, nil
	}
	if resp.Win && resp.Stale {
		c.s.l.release(ctx, key, resp.CAS, true)
	}
	if resp.Size == 0 && resp.ClientFlags == 0 && (resp.Claimed || resp.Stale || resp.Win) {
		return stateLeased, nil
	}
	return statePresent, nil
}

// delete deletes key. The empty item of a lease is deleted too (which
// refuses the lease's fill: a delete is an invalidation) but answered
// NOT_FOUND, as the client never saw a value.
func (c *conn) delete(ctx context.Context, b []byte, key string) []byte {
	state, err := c.probe(ctx, key)
	if err != nil {
		return c.backendError(b, err)
	}
	if state == stateAbsent {
		return append(b, rNotFound...)
	}
	resp, err := c.s.be.MetaDelete(ctx, key, mcpool.DeleteOptions{})
	switch {
	case err != nil:
		return c.backendError(b, err)
	case resp.Status == mcpool.StatusHD && state == statePresent:
		return append(b, rDeleted...)
	}
	return append(b, rNotFound...)
}

// arith answers incr and decr.
func (c *conn) arith(ctx context.Context, b []byte, cmd *Command) []byte {
	state, err := c.probe(ctx, cmd.Keys[0])
	if err != nil {
		return c.backendError(b, err)
	}
	if state != statePresent {
		return append(b, rNotFound...)
	}
	resp, err := c.s.be.MetaArithmetic(ctx, cmd.Keys[0], mcpool.ArithmeticOptions{
		Decrement: cmd.Op == OpDecr, Delta: cmd.Delta, Flags: deltaZero(cmd.Delta)})
	switch {
	case err != nil:
		return c.backendError(b, err)
	case resp.Status == mcpool.StatusVA:
		b = append(b, resp.Value...)
		return append(b, '\r', '\n')
	case resp.Status == mcpool.StatusNF:
		return append(b, rNotFound...)
	}
	return appendLine(b, "SERVER_ERROR unexpected "+resp.Status.String())
}

// deltaZero sends an explicit D0: ma without D means 1.
func deltaZero(d uint64) []string {
	if d == 0 {
		return []string{"D0"}
	}
	return nil
}

func (c *conn) backendError(b []byte, err error) []byte {
	if !errIsClient(err) {
		c.s.st.backendErrors.Add(1)
	}
	return appendLine(b, errorReply(err))
}

// retrieve answers get, gets, gat and gats. Values are written to the
// client as they come: the keys of a multi-key command are read in
// batches of MultiGetParallel (see getMany), each written out before the
// next is read, in request order. A key whose server fails is a miss:
// the other keys are unaffected.
func (c *conn) retrieve(ctx context.Context, b []byte, cmd *Command) []byte {
	s := c.s
	withCAS := cmd.Op == OpGets || cmd.Op == OpGats
	touch := cmd.Op == OpGat || cmd.Op == OpGats
	s.st.cmdGet.Add(uint64(len(cmd.Keys)))
	if touch {
		s.st.cmdTouch.Add(uint64(len(cmd.Keys)))
	}
	if len(cmd.Keys) == 1 {
		r := c.getOne(ctx, cmd.Keys[0], touch, cmd.Exptime)
		c.writeResult(cmd.Keys[0], &r, withCAS)
		return append(b, rEnd...)
	}
	keys := cmd.Keys
	step := s.cfg.MultiGetParallel
	// won holds the keys of this command that won a lease: named again
	// in a later batch, they are a miss (a read would find the client's
	// own lease and wait for it).
	var won map[string]struct{}
	for i := 0; i < len(keys) && c.werr == nil; i += step {
		batch := keys[i:min(i+step, len(keys))]
		results, reserved := c.getMany(ctx, batch, touch, cmd.Exptime, won)
		for j := range results {
			if results[j].lease != 0 && i+step < len(keys) {
				if won == nil {
					won = make(map[string]struct{})
				}
				won[batch[j]] = struct{}{}
			}
			c.writeResult(batch[j], &results[j], withCAS)
			results[j] = getResult{}
		}
		s.replies.release(reserved)
	}
	return append(b, rEnd...)
}

// getMany reads the keys of a batch of a multi-key retrieval command:
// pipelined when the backend can, else in parallel. Keys in skip are a
// miss without a read. reserved is what the read reserved of the
// server's reply budget, for the caller to release.
func (c *conn) getMany(ctx context.Context, keys []string, touch bool, exptime int64, skip map[string]struct{}) (results []getResult, reserved int64) {
	s := c.s
	results = make([]getResult, len(keys))
	read := keys
	var at []int // position in keys of each key of read, when some are skipped
	if len(skip) > 0 {
		read = make([]string, 0, len(keys))
		for i, k := range keys {
			if _, ok := skip[k]; !ok {
				read = append(read, k)
				at = append(at, i)
			}
		}
		if len(read) == 0 {
			return results, 0
		}
	}
	got := results
	if at != nil {
		got = make([]getResult, len(read))
	}
	errs := make([]error, len(read))
	reserved, ok := s.l.getMulti(ctx, read, got, errs, s.replies, int64(s.cfg.MaxValueBytes))
	if ok {
		for i := range got {
			if errs[i] != nil {
				s.st.backendErrors.Add(1)
				got[i] = getResult{waited: got[i].waited}
				continue
			}
			c.touchResult(ctx, read[i], &got[i], touch, exptime)
		}
	} else {
		var next atomic.Int64
		var wg sync.WaitGroup
		for w := min(len(read), s.cfg.MultiGetParallel); w > 0; w-- {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1) - 1)
					if i >= len(got) {
						return
					}
					got[i] = c.getOne(ctx, read[i], touch, exptime)
				}
			}()
		}
		wg.Wait()
	}
	for j, i := range at {
		results[i] = got[j]
	}
	return results, reserved
}

// getOne reads key for a retrieval command; with touch, a value found
// fresh gets exptime. A key whose server fails is a miss.
func (c *conn) getOne(ctx context.Context, key string, touch bool, exptime int64) getResult {
	r, err := c.s.l.get(ctx, key)
	if err != nil {
		c.s.st.backendErrors.Add(1)
		return getResult{waited: r.waited}
	}
	c.touchResult(ctx, key, &r, touch, exptime)
	return r
}

// touchResult gives a value found fresh the new exptime, for gat and gats.
func (c *conn) touchResult(ctx context.Context, key string, r *getResult, touch bool, exptime int64) {
	if touch && r.found && !r.stale {
		cas, ok, err := c.rewrite(ctx, key, &r.item, exptime)
		if err == nil && ok {
			r.item.cas = cas
		}
	}
}

// writeResult writes one key's result of a retrieval to the client: its
// VALUE line and data when found. A lease the read won for the client is
// remembered on this connection, for its fill.
func (c *conn) writeResult(key string, r *getResult, withCAS bool) {
	switch {
	case r.lease != 0:
		c.bind(key, boundLease{cas: r.lease, unrecorded: r.unrecorded})
	case r.waited:
		c.bind(key, boundLease{waited: true})
	default:
		c.unbindWaited(key)
	}
	if !r.found {
		c.s.st.misses.Add(1)
		return
	}
	c.s.st.hits.Add(1)
	c.hdr = appendValueHeader(c.hdr[:0], key, &r.item, withCAS)
	c.write(c.hdr)
	c.write(r.item.value)
	c.write(crlf)
}

// rewrite sets key's TTL to exptime by storing the value just read again
// with a CAS compare. mg T would also extend an empty lease item or a
// stale one if the key changed between the read and the touch; the CAS
// makes the touch apply only to the item read.
func (c *conn) rewrite(ctx context.Context, key string, it *item, exptime int64) (uint64, bool, error) {
	opt := setOptions(0, it.flags, exptime, it.cas)
	opt.ReturnCAS = true
	resp, err := c.s.be.MetaSet(ctx, key, it.value, opt)
	if err != nil {
		return 0, false, err
	}
	return resp.CAS, resp.Status == mcpool.StatusHD, nil
}

// touch implements touch on top of rewrite: read, then store with CAS,
// retried if a write came in between. An empty lease item, a stale item
// and a missing one are NOT_FOUND.
func (c *conn) touch(ctx context.Context, key string, exptime int64) (bool, error) {
	for range 3 {
		resp, err := c.s.be.MetaGet(ctx, key, "v", "f", "c")
		if err != nil {
			return false, err
		}
		if resp.Status != mcpool.StatusVA {
			return false, nil
		}
		if resp.Stale {
			if resp.Win {
				c.s.l.release(ctx, key, resp.CAS, true)
			}
			return false, nil
		}
		if resp.Claimed && isStub(&resp) {
			return false, nil
		}
		it := itemOf(&resp)
		_, ok, err := c.rewrite(ctx, key, &it, exptime)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

// store answers the storage commands. A set or add of a key under a lease
// is the lease's fill and is checked against it (see leaser.fill).
func (c *conn) store(ctx context.Context, b []byte, cmd *Command, value []byte) []byte {
	s := c.s
	key := cmd.Keys[0]
	var mode byte
	switch cmd.Op {
	case OpSet, OpAdd:
		res, err := s.l.fill(ctx, key, c.takeBinding(key), cmd.Op == OpAdd, value, cmd.Flags, cmd.Exptime)
		switch {
		case err != nil:
			return c.backendError(b, err)
		case res == fillStored:
			return append(b, rStored...)
		case res == fillRefused:
			return append(b, rNotStored...)
		}
		if cmd.Op == OpAdd {
			mode = 'E'
		}
	case OpReplace, OpAppend, OpPrepend:
		mode = 'R'
		if cmd.Op == OpAppend {
			mode = 'A'
		} else if cmd.Op == OpPrepend {
			mode = 'P'
		}
		state, err := c.probe(ctx, key)
		if err != nil {
			return c.backendError(b, err)
		}
		if state != statePresent {
			return append(b, rNotStored...)
		}
	}
	var opt mcpool.SetOptions
	if cmd.Op == OpAppend || cmd.Op == OpPrepend {
		// They keep the item's flags and TTL.
		opt = mcpool.SetOptions{Mode: mode}
	} else {
		opt = setOptions(mode, cmd.Flags, cmd.Exptime, cmd.CAS)
	}
	if cmd.Op == OpCas && cmd.CAS == 0 {
		// C0 would be "no compare" to mcpool; no item has CAS 0.
		return append(b, rExists...)
	}
	resp, err := s.be.MetaSet(ctx, key, value, opt)
	if err != nil {
		return c.backendError(b, err)
	}
	if resp.Status == mcpool.StatusNF && cmd.Op != OpCas {
		return append(b, rNotStored...)
	}
	return append(b, storeReply(resp.Status)...)
}

// meta passes a meta command through to the key's server and relays the
// response as memcached wrote it.
func (c *conn) meta(ctx context.Context, b []byte, cmd *Command, value []byte) []byte {
	if cmd.Op == OpMetaNoop {
		return append(b, rMN...)
	}
	resp, err := c.s.be.Do(ctx, cmd.Line, value)
	if err != nil {
		return c.backendError(b, err)
	}
	return resp.Append(b)
}

// stats answers "stats" with the proxy's own figures.
func (c *conn) stats(b []byte) []byte {
	s := c.s
	now := time.Now()
	line := func(name, v string) {
		b = append(b, "STAT "...)
		b = append(b, name...)
		b = append(b, ' ')
		b = append(b, v...)
		b = append(b, '\r', '\n')
	}
	line("pid", strconv.Itoa(os.Getpid()))
	line("uptime", formatInt(int64(now.Sub(s.start)/time.Second)))
	line("time", formatInt(now.Unix()))
	line("version", s.cfg.Version)
	for _, kv := range s.Stats().statLines() {
		line(kv[0], kv[1])
	}
	return append(b, rEnd...)
}
