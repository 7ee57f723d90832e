// Package mcpool is one datacenter's memcached pool: it places keys on
// servers with a hash ring (ketama as in libmemcached and twemproxy, or
// gomemcache's crc32 modula) and talks memcached's meta protocol over
// pipelined connections, with a circuit breaker per server. It knows
// nothing of leases, invalidation rules or the WAL: callers (purge, lease)
// decide what to send and what a response means to them.
//
// # Placement
//
// A [Ring] maps a key to the index of a server in the configured list.
// Hash "ketama" places keys exactly as twemproxy 0.5.0 (nutcracker) with
//
//	distribution: ketama
//	hash: md5
//
// which is also libmemcached's MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED placement
// (MD5 of the key, 160 points per server scaled by weight, 4 points per MD5
// digest of "name-N"). Server specs follow nutcracker's syntax,
// "host:port[:weight][ name]": the points are built from the name when one
// is given, else from "host:port". Hash "modula" is gomemcache's
// ServerList: crc32.ChecksumIEEE(key) % n. [NewSelector] wraps a Ring as a
// gomemcache ServerSelector so gomemcache readers agree with this package.
//
// # Connections
//
// A [Conn] is one TCP connection to one server with many requests in
// flight. Writes are combined: a caller appends its request to the
// connection's buffer and, if no write is under way, yields once (so that
// callers about to send join it) and writes the buffer itself; a busy
// writer hands the rest to the connection's writer goroutine. A reader
// goroutine matches responses to requests in order (memcached answers in
// order on a connection) and hands each to its caller. Requests, their
// buffers and result channels are pooled. A request with the q flag is
// followed by "mn" so that a suppressed response cannot desynchronise the
// pipeline; the multi-key deletes send one chain per server instead,
// "md <key> q O<i>" for each key and one "mn", so that memcached answers
// only the deletes that fail (matched to their key by the opaque). Responses are parsed into [Response] by a parser that never
// panics (fuzzed).
//
// # Keys
//
// A key is 1 to 250 bytes without space, CR, LF or NUL: the keys
// memcached's text protocol stores. Keys with other control bytes (tab,
// 0x01-0x1f, 0x7f) are sent in base64 with the b flag, as protocol.txt
// asks, or as written when base64 would exceed 250 bytes (memcached
// 1.6.18 accepts that too); the item is the one a text-protocol client
// names with the same bytes, and it is placed by its raw bytes, where
// nutcracker and libmemcached put it. A caller may send a key in base64
// itself with the b flag: it goes as written and is placed by its decoded
// bytes.
//
// # Pool
//
// A [Pool] holds Config.ConnsPerServer connections per server, reconnects
// with backoff, and keeps a breaker per server (closed, open, half-open).
// A dead server costs only its own keys a fast error ([ErrServerDown] or
// [ErrBreakerOpen]); other servers are unaffected. Every request has a
// deadline: the ctx's if it has one, else Config.Timeout. Errors are
// classified with [Retryable]. Metrics are left to callers: see
// [Pool.Stats] and Config.OnBreakerChange.
//
// A timeout is a [*TimeoutError] that says where the request was
// ([TimeoutWhere]): never written (queued), written in the last half of
// its timeout with nothing back since (late), written with bytes from
// the server received on its connection since (answering), or written
// with nothing back for at least half its timeout (silent). Only silent
// timeouts count against the breaker: a client process too busy to send
// its requests or read the answers in time (a herd on a starved host)
// must not open the breaker of a healthy server, while a dead, stopped
// or black-holed one still opens it.
//
// API summary (see each declaration for details):
//
//	// placement
//	func NewRing(hash string, servers []string) (*Ring, error) // HashKetama | HashModula
//	func (r *Ring) Pick(key string) int
//	func (r *Ring) Len() int
//	func (r *Ring) Server(i int) Server
//	func ParseServer(spec string) (Server, error)
//	func NewSelector(r *Ring) (*Selector, error) // a memcache.ServerSelector
//
//	// one connection
//	func Dial(ctx context.Context, addr string, cfg ConnConfig) (*Conn, error)
//	func (c *Conn) MetaGet(ctx context.Context, key string, flags ...string) (Response, error)
//	func (c *Conn) MetaSet(ctx context.Context, key string, value []byte, opt SetOptions) (Response, error)
//	func (c *Conn) MetaDelete(ctx context.Context, key string, opt DeleteOptions) (Response, error)
//	func (c *Conn) MetaArithmetic(ctx context.Context, key string, opt ArithmeticOptions) (Response, error)
//	func (c *Conn) NoOp(ctx context.Context) error
//	func (c *Conn) Do(ctx context.Context, request, value []byte) (Response, error)
//	func (c *Conn) Close() error
//
//	// the pool: the same request methods, routed by key, plus
//	func New(cfg Config, log *zap.Logger) (*Pool, error)
//	func (p *Pool) Delete(ctx context.Context, key string) error                       // NF is success
//	func (p *Pool) MarkStale(ctx context.Context, key string, ttl time.Duration) error // md <key> I T<ttl>
//	func (p *Pool) MetaGetMulti(ctx context.Context, keys []string, flags ...string) ([]Response, []error) // pipelined
//	func (p *Pool) DeleteMulti(ctx context.Context, keys []string) []error // quiet chain per server
//	func (p *Pool) MarkStaleMulti(ctx context.Context, keys []string, ttl time.Duration) []error
//	func (p *Pool) DeleteMultiOn(ctx context.Context, server int, keys []string) []error // keys placed already
//	func (p *Pool) MarkStaleMultiOn(ctx context.Context, server int, keys []string, ttl time.Duration) []error
//	func (p *Pool) NoOp(ctx context.Context, server int) error
//	func (p *Pool) FlushAll(ctx context.Context, server int) error // flush_all noreply, then mn
//	func (p *Pool) Servers() int
//	func (p *Pool) Addr(server int) string
//	func (p *Pool) Stats() []ServerStats
//	func (p *Pool) BreakerState(server int) BreakerState
//	func (p *Pool) Close() error
//
//	func Retryable(err error) bool
//	func TimeoutWhereOf(err error) TimeoutWhere // queued, late, answering, silent
//	func (s ServerStats) TimeoutsOf(w TimeoutWhere) uint64
//
// Memcached applies mg flags in the order given: "N30 t" reports the TTL
// of the item N creates, "t N30" reports -1.
package mcpool
