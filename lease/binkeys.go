package lease

import (
	"context"
	"encoding/base64"

	"github.com/pgcache/pgcache/mcpool"
)

// binaryKeys sends keys that hold control characters in base64 with the
// meta protocol's b flag. memcached accepts such keys in the text protocol
// (memcaslap's keys start with 0x10 bytes), and b makes memcached store
// the decoded bytes, the same item a text-protocol get sees; mcpool only
// sends printable keys. Other keys pass through untouched.
//
// Placement caveat: the pool places a base64-sent key by its base64 form,
// so such keys are consistent across leaseproxies but not placed as
// nutcracker or libmemcached would place the raw key.
type binaryKeys struct {
	Backend
}

// encodeKey returns the key to send and whether it is base64.
func encodeKey(key string) (string, bool) {
	for i := 0; i < len(key); i++ {
		if c := key[i]; c <= ' ' || c == 0x7f {
			return base64.StdEncoding.EncodeToString([]byte(key)), true
		}
	}
	return key, false
}

func withB(flags []string, b bool) []string {
	if !b {
		return flags
	}
	return append(append(make([]string, 0, len(flags)+1), flags...), "b")
}

func (k binaryKeys) MetaGet(ctx context.Context, key string, flags ...string) (mcpool.Response, error) {
	key, b := encodeKey(key)
	return k.Backend.MetaGet(ctx, key, withB(flags, b)...)
}

func (k binaryKeys) MetaSet(ctx context.Context, key string, value []byte, opt mcpool.SetOptions) (mcpool.Response, error) {
	key, b := encodeKey(key)
	opt.Flags = withB(opt.Flags, b)
	return k.Backend.MetaSet(ctx, key, value, opt)
}

func (k binaryKeys) MetaDelete(ctx context.Context, key string, opt mcpool.DeleteOptions) (mcpool.Response, error) {
	key, b := encodeKey(key)
	opt.Flags = withB(opt.Flags, b)
	return k.Backend.MetaDelete(ctx, key, opt)
}

func (k binaryKeys) MetaArithmetic(ctx context.Context, key string, opt mcpool.ArithmeticOptions) (mcpool.Response, error) {
	key, b := encodeKey(key)
	opt.Flags = withB(opt.Flags, b)
	return k.Backend.MetaArithmetic(ctx, key, opt)
}

func (k binaryKeys) Pick(key string) int {
	key, _ = encodeKey(key)
	return k.Backend.Pick(key)
}
