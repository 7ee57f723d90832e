package mcpool

import (
	"crypto/md5"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
)

// Hash names accepted by NewRing and Config.Hash.
const (
	// HashKetama is twemproxy's "distribution: ketama" with "hash: md5",
	// the libmemcached-compatible consistent hashing.
	HashKetama = "ketama"
	// HashModula is gomemcache's ServerList: crc32.ChecksumIEEE(key) % n.
	// It is not twemproxy's "distribution: modula".
	HashModula = "modula"
)

// Server is one entry of the server list.
type Server struct {
	// Addr is the address to dial, host:port.
	Addr string
	// Weight scales the server's share of the ketama ring. 1 when the spec
	// gave none. Modula ignores it and requires 1.
	Weight int
	// Name is the string ketama builds the server's points from: the name
	// given in the spec, else what twemproxy uses, "host:port", or just
	// "host" when the port is 11211 (libmemcached compatibility).
	Name string
}

// ketamaDefaultPort is the port twemproxy and libmemcached leave out of a
// server's point names.
const ketamaDefaultPort = "11211"

// ParseServer parses a server spec in twemproxy's syntax
// "host:port[:weight][ name]": "10.0.0.1:11211",
// "10.0.0.1:11212:2" or "10.0.0.1:11211:1 cache-a". A weight is optional
// here (twemproxy requires it). IPv6 hosts go in brackets.
func ParseServer(spec string) (Server, error) {
	s := strings.TrimSpace(spec)
	var name string
	if i := strings.LastIndexByte(s, ' '); i >= 0 {
		s, name = strings.TrimSpace(s[:i]), s[i+1:]
		if name == "" || strings.ContainsAny(s, " \t") {
			return Server{}, fmt.Errorf("%w: server %q: want \"host:port[:weight][ name]\"", ErrConfig, spec)
		}
	}
	weight := 1
	hostPort := s
	host, port, err := net.SplitHostPort(s)
	if err != nil || !isPort(port) {
		i := strings.LastIndexByte(s, ':')
		if i < 0 {
			return Server{}, fmt.Errorf("%w: server %q: want \"host:port[:weight][ name]\"", ErrConfig, spec)
		}
		w, werr := strconv.Atoi(s[i+1:])
		if werr != nil || w <= 0 {
			return Server{}, fmt.Errorf("%w: server %q: weight must be a positive integer", ErrConfig, spec)
		}
		weight, hostPort = w, s[:i]
		host, port, err = net.SplitHostPort(hostPort)
		if err != nil || !isPort(port) {
			return Server{}, fmt.Errorf("%w: server %q: want \"host:port[:weight][ name]\"", ErrConfig, spec)
		}
	}
	if host == "" {
		return Server{}, fmt.Errorf("%w: server %q: empty host", ErrConfig, spec)
	}
	srv := Server{Addr: net.JoinHostPort(host, port), Weight: weight, Name: name}
	if srv.Name == "" {
		// twemproxy's conf_add_server: the spec's text before the weight,
		// without ":port" when the port is 11211.
		srv.Name = hostPort
		if port == ketamaDefaultPort {
			srv.Name = hostPort[:strings.LastIndexByte(hostPort, ':')]
		}
	}
	return srv, nil
}

func isPort(p string) bool {
	n, err := strconv.Atoi(p)
	return err == nil && n > 0 && n < 65536 && p[0] != '+' && p[0] != '-'
}

// Ring maps keys to servers. It is immutable and safe for concurrent use.
type Ring struct {
	hash    string
	servers []Server
	points  []ketamaPoint // sorted by value; ketama only
}

type ketamaPoint struct {
	value uint32
	index uint32
}

// twemproxy's constants (src/hashkit/nc_ketama.c).
const (
	ketamaPointsPerServer = 160
	ketamaPointsPerHash   = 4
	ketamaMaxHostLen      = 86 // snprintf buffer, including the NUL
)

// NewRing builds a ring over servers (specs as ParseServer reads them) with
// hash HashKetama or HashModula. The index Pick returns is a position in
// servers.
func NewRing(hash string, servers []string) (*Ring, error) {
	if len(servers) == 0 {
		return nil, fmt.Errorf("%w: no servers", ErrConfig)
	}
	r := &Ring{hash: hash, servers: make([]Server, len(servers))}
	for i, spec := range servers {
		s, err := ParseServer(spec)
		if err != nil {
			return nil, err
		}
		r.servers[i] = s
	}
	switch hash {
	case HashKetama:
		if err := r.buildKetama(); err != nil {
			return nil, err
		}
	case HashModula:
		for _, s := range r.servers {
			if s.Weight != 1 {
				return nil, fmt.Errorf("%w: server %s: hash %q does not support weights", ErrConfig, s.Addr, hash)
			}
		}
	default:
		return nil, fmt.Errorf("%w: hash %q: want %q or %q", ErrConfig, hash, HashKetama, HashModula)
	}
	return r, nil
}

// buildKetama is twemproxy 0.5.0's ketama_update with every server live.
func (r *Ring) buildKetama() error {
	n := len(r.servers)
	var total uint32
	for _, s := range r.servers {
		total += uint32(s.Weight)
	}
	for i, s := range r.servers {
		// C: floorf((float)(pct * 160 / 4 * (float)n + 0.0000000001)) * 4,
		// with pct a float; each step is rounded to float32 as in C.
		pct := float32(s.Weight) / float32(total)
		x := float32(float32(pct*float32(ketamaPointsPerServer)) / 4)
		x = float32(x * float32(n))
		x = float32(float64(x) + 0.0000000001)
		perServer := uint32(math.Floor(float64(x))) * 4
		for p := uint32(0); p < perServer/ketamaPointsPerHash; p++ {
			host := s.Name + "-" + strconv.FormatUint(uint64(p), 10)
			if len(host) >= ketamaMaxHostLen {
				return fmt.Errorf("%w: server %s: point name %q longer than twemproxy's %d bytes", ErrConfig, s.Addr, host, ketamaMaxHostLen-1)
			}
			d := md5.Sum([]byte(host))
			for x := 0; x < ketamaPointsPerHash; x++ {
				r.points = append(r.points, ketamaPoint{
					value: binary.LittleEndian.Uint32(d[x*4:]),
					index: uint32(i),
				})
			}
		}
	}
	if len(r.points) == 0 {
		return fmt.Errorf("%w: ketama ring has no points", ErrConfig)
	}
	// Stable, as glibc's merge sort qsort; ties are 32-bit collisions.
	slices.SortStableFunc(r.points, func(a, b ketamaPoint) int {
		switch {
		case a.value < b.value:
			return -1
		case a.value > b.value:
			return 1
		}
		return 0
	})
	return nil
}

// Pick returns the index of the server that holds key.
func (r *Ring) Pick(key string) int {
	switch r.hash {
	case HashModula:
		if len(r.servers) == 1 {
			return 0
		}
		// gomemcache copies the key into a 256-byte buffer before hashing.
		if len(key) > 256 {
			key = key[:256]
		}
		return int(crc32.ChecksumIEEE([]byte(key)) % uint32(len(r.servers)))
	default:
		return int(r.points[ketamaSearch(r.points, ketamaKeyHash(key))].index)
	}
}

// ketamaKeyHash is twemproxy's hash_md5: the first four bytes of the key's
// MD5, little endian.
func ketamaKeyHash(key string) uint32 {
	var buf [MaxKeyLen]byte // keys fit: no allocation
	var d [md5.Size]byte
	if len(key) <= len(buf) {
		d = md5.Sum(buf[:copy(buf[:], key)])
	} else {
		d = md5.Sum([]byte(key))
	}
	return binary.LittleEndian.Uint32(d[:4])
}

// ketamaSearch is ketama_dispatch: the first point >= h, wrapping to 0.
func ketamaSearch(points []ketamaPoint, h uint32) int {
	left, right := 0, len(points)
	for left < right {
		mid := left + (right-left)/2
		if points[mid].value < h {
			left = mid + 1
		} else {
			right = mid
		}
	}
	if right == len(points) {
		return 0
	}
	return right
}

// Len returns the number of servers.
func (r *Ring) Len() int { return len(r.servers) }

// Server returns server i as parsed from its spec.
func (r *Ring) Server(i int) Server { return r.servers[i] }

// Hash returns the ring's hash name.
func (r *Ring) Hash() string { return r.hash }

// Selector is a gomemcache memcache.ServerSelector that places keys with a
// Ring, for use with memcache.NewFromSelector.
type Selector struct {
	ring  *Ring
	addrs []net.Addr
}

// NewSelector resolves the ring's addresses as gomemcache's ServerList does.
func NewSelector(r *Ring) (*Selector, error) {
	s := &Selector{ring: r, addrs: make([]net.Addr, r.Len())}
	for i, srv := range r.servers {
		a, err := net.ResolveTCPAddr("tcp", srv.Addr)
		if err != nil {
			return nil, fmt.Errorf("resolve %s: %w", srv.Addr, err)
		}
		s.addrs[i] = a
	}
	return s, nil
}

// PickServer returns the address of the server that holds key.
func (s *Selector) PickServer(key string) (net.Addr, error) {
	return s.addrs[s.ring.Pick(key)], nil
}

// Each calls f for each server, in order, until f returns an error.
func (s *Selector) Each(f func(net.Addr) error) error {
	for _, a := range s.addrs {
		if err := f(a); err != nil {
			return err
		}
	}
	return nil
}
