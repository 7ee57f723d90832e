package lease

import (
	"strconv"

	"github.com/pgcache/pgcache/mckey"
)

// MaxKeyBytes is memcached's key length limit.
const MaxKeyBytes = mckey.MaxLen

// maxSwallow bounds the data block the server reads and discards after a
// refused storage line; beyond it the connection is closed instead, so a
// client announcing a huge block cannot hold a connection busy.
const maxSwallow = 64 << 20

// binaryMagic opens every request of memcached's binary protocol.
const binaryMagic = 0x80

// Op is a text-protocol command.
type Op uint8

// Commands of memcached's text protocol that the proxy answers.
const (
	OpGet Op = iota + 1
	OpGets
	OpGat
	OpGats
	OpSet
	OpAdd
	OpReplace
	OpAppend
	OpPrepend
	OpCas
	OpDelete
	OpIncr
	OpDecr
	OpTouch
	OpVersion
	OpStats
	OpFlushAll
	OpVerbosity
	OpQuit
	OpMetaGet    // mg
	OpMetaSet    // ms
	OpMetaDelete // md
	OpMetaArith  // ma
	OpMetaNoop   // mn
	OpMetaDebug  // me
)

var opNames = [...]string{"", "get", "gets", "gat", "gats", "set", "add", "replace", "append", "prepend",
	"cas", "delete", "incr", "decr", "touch", "version", "stats", "flush_all", "verbosity", "quit",
	"mg", "ms", "md", "ma", "mn", "me"}

func (o Op) String() string {
	if int(o) < len(opNames) && o != 0 {
		return opNames[o]
	}
	return "Op(" + strconv.Itoa(int(o)) + ")"
}

// IsRetrieval reports whether o is get, gets, gat or gats.
func (o Op) IsRetrieval() bool { return o >= OpGet && o <= OpGats }

// IsStorage reports whether o is followed by a data block in the text
// protocol (set, add, replace, append, prepend, cas).
func (o Op) IsStorage() bool { return o >= OpSet && o <= OpCas }

// IsMeta reports whether o is a meta command, passed through to the pool.
func (o Op) IsMeta() bool { return o >= OpMetaGet && o <= OpMetaDebug }

func lookupOp(b []byte) Op {
	switch string(b) {
	case "get":
		return OpGet
	case "gets":
		return OpGets
	case "gat":
		return OpGat
	case "gats":
		return OpGats
	case "set":
		return OpSet
	case "add":
		return OpAdd
	case "replace":
		return OpReplace
	case "append":
		return OpAppend
	case "prepend":
		return OpPrepend
	case "cas":
		return OpCas
	case "delete":
		return OpDelete
	case "incr":
		return OpIncr
	case "decr":
		return OpDecr
	case "touch":
		return OpTouch
	case "version":
		return OpVersion
	case "stats":
		return OpStats
	case "flush_all":
		return OpFlushAll
	case "verbosity":
		return OpVerbosity
	case "quit":
		return OpQuit
	case "mg":
		return OpMetaGet
	case "ms":
		return OpMetaSet
	case "md":
		return OpMetaDelete
	case "ma":
		return OpMetaArith
	case "mn":
		return OpMetaNoop
	case "me":
		return OpMetaDebug
	}
	return 0
}

// Command is one parsed command line.
type Command struct {
	Op Op
	// Keys holds the keys: one or more for retrieval commands, one for the
	// other keyed commands (meta included), none otherwise.
	Keys []string
	// Flags is the client flags of a storage command.
	Flags uint32
	// Exptime is the expiration of a storage command, touch, gat and gats,
	// as the client sent it (seconds, or a Unix time beyond 30 days;
	// negative: expired), and the delay of flush_all.
	Exptime int64
	// Bytes is the length of the data block that follows the line
	// (storage commands and ms), without its CRLF. 0 otherwise.
	Bytes int
	// CAS is the compare value of cas.
	CAS uint64
	// Delta is the amount of incr and decr.
	Delta uint64
	// NoReply is set when the line ends with "noreply".
	NoReply bool
	// Args are the arguments of stats and verbosity.
	Args []string
	// Line is a meta command's line, tokens joined by single spaces,
	// without CRLF: what is forwarded to the pool.
	Line []byte
}

// ParseCommand parses one command line of memcached's text protocol (with
// or without its line ending). maxValue is the largest data block a
// storage command may announce. It never panics. A bad line returns a
// *ProtocolError that says what to reply and how to stay in step.
func ParseCommand(line []byte, maxValue int) (Command, error) {
	if len(line) > 0 && line[0] == binaryMagic {
		return Command{}, &ProtocolError{Err: ErrBinaryProtocol, Reply: replyBinary, Close: true}
	}
	var toks [24][]byte
	t := tokenize(line, toks[:0])
	if len(t) == 0 {
		return Command{}, protoErr(ErrUnknownCommand, replyError)
	}
	op := lookupOp(t[0])
	cmd := Command{Op: op}
	args := t[1:]
	switch {
	case op == 0:
		return Command{}, protoErr(ErrUnknownCommand, replyError)
	case op.IsRetrieval():
		return parseRetrieval(cmd, args)
	case op.IsStorage():
		return parseStorage(cmd, args, maxValue)
	case op.IsMeta():
		return parseMeta(cmd, t, maxValue)
	}
	switch op {
	case OpDelete:
		// delete <key> [0] [noreply]; the 0 is a legacy hold time.
		args, cmd.NoReply = cutNoReply(args)
		if len(args) == 2 && string(args[1]) == "0" {
			args = args[:1]
		}
		if len(args) != 1 {
			return Command{}, protoErr(ErrBadCommand, replyBadDelete)
		}
		return withKey(cmd, args[0])
	case OpIncr, OpDecr:
		args, cmd.NoReply = cutNoReply(args)
		if len(args) != 2 {
			return Command{}, protoErr(ErrUnknownCommand, replyError)
		}
		d, ok := parseUint(args[1], 64)
		if !ok {
			return Command{}, protoErr(ErrBadCommand, replyBadDelta)
		}
		cmd.Delta = d
		return withKey(cmd, args[0])
	case OpTouch:
		args, cmd.NoReply = cutNoReply(args)
		if len(args) != 2 {
			return Command{}, protoErr(ErrUnknownCommand, replyError)
		}
		e, ok := parseInt(args[1])
		if !ok {
			return Command{}, protoErr(ErrBadCommand, replyBadExptime)
		}
		cmd.Exptime = e
		return withKey(cmd, args[0])
	case OpVersion, OpQuit:
		// memcached 1.6.18 ignores their arguments; so do its tests.
		return cmd, nil
	case OpStats:
		for _, a := range args {
			cmd.Args = append(cmd.Args, string(a))
		}
		return cmd, nil
	case OpFlushAll:
		args, cmd.NoReply = cutNoReply(args)
		if len(args) > 1 {
			return Command{}, protoErr(ErrUnknownCommand, replyError)
		}
		if len(args) == 1 {
			e, ok := parseInt(args[0])
			if !ok || e < 0 {
				return Command{}, protoErr(ErrBadCommand, replyBadExptime)
			}
			cmd.Exptime = e
		}
		return cmd, nil
	case OpVerbosity:
		// verbosity <level> [noreply]; the level is not checked, as in
		// memcached 1.6.18, and has no effect on the proxy's logs.
		if len(args) < 1 || len(args) > 2 {
			return Command{}, protoErr(ErrUnknownCommand, replyError)
		}
		_, cmd.NoReply = cutNoReply(args)
		return cmd, nil
	}
	return Command{}, protoErr(ErrUnknownCommand, replyError)
}

func parseRetrieval(cmd Command, args [][]byte) (Command, error) {
	if cmd.Op == OpGat || cmd.Op == OpGats {
		if len(args) < 2 {
			return Command{}, protoErr(ErrUnknownCommand, replyError)
		}
		e, ok := parseInt(args[0])
		if !ok {
			return Command{}, protoErr(ErrBadCommand, replyBadExptime)
		}
		cmd.Exptime = e
		args = args[1:]
	}
	if len(args) == 0 {
		return Command{}, protoErr(ErrUnknownCommand, replyError)
	}
	cmd.Keys = make([]string, 0, len(args))
	for _, k := range args {
		if !validKey(k) {
			return Command{}, protoErr(ErrBadKey, replyBadFormat)
		}
		cmd.Keys = append(cmd.Keys, string(k))
	}
	return cmd, nil
}

// parseStorage parses
//
//	<set|add|replace|append|prepend> <key> <flags> <exptime> <bytes> [noreply]
//	cas <key> <flags> <exptime> <bytes> <cas unique> [noreply]
func parseStorage(cmd Command, args [][]byte, maxValue int) (Command, error) {
	want := 4
	if cmd.Op == OpCas {
		want = 5
	}
	args, cmd.NoReply = cutNoReply(args)
	if len(args) != want {
		// memcached answers ERROR to a storage line with the wrong number
		// of tokens. The data block length cannot be trusted: no swallow.
		return Command{}, protoErr(ErrUnknownCommand, replyError)
	}
	n, nok := parseInt(args[3])
	if !nok || n < 0 || n > 1<<31-3 {
		return Command{}, protoErr(ErrBadCommand, replyBadFormat)
	}
	// From here on the data block length is known: a refused line swallows
	// the block so that it is not read as commands.
	fail := func(err error, reply string) (Command, error) {
		e := protoErr(err, reply)
		if n+2 <= maxSwallow {
			e.Swallow = int(n) + 2
		} else {
			e.Close = true
		}
		return Command{}, e
	}
	if !validKey(args[0]) {
		return fail(ErrBadKey, replyBadFormat)
	}
	flags, ok := parseUint(args[1], 32)
	if !ok {
		return fail(ErrBadCommand, replyBadFormat)
	}
	exp, ok := parseInt(args[2])
	if !ok {
		return fail(ErrBadCommand, replyBadFormat)
	}
	if cmd.Op == OpCas {
		cas, ok := parseUint(args[4], 64)
		if !ok {
			return fail(ErrBadCommand, replyBadFormat)
		}
		cmd.CAS = cas
	}
	if n > int64(maxValue) {
		return fail(ErrValueTooLarge, replyTooLarge)
	}
	cmd.Keys = []string{string(args[0])}
	cmd.Flags = uint32(flags)
	cmd.Exptime = exp
	cmd.Bytes = int(n)
	return cmd, nil
}

// parseMeta checks the shape of a meta command (key, data length of ms)
// and keeps its line for forwarding; the flags are the pool's business.
func parseMeta(cmd Command, t [][]byte, maxValue int) (Command, error) {
	if cmd.Op == OpMetaNoop {
		if len(t) != 1 {
			return Command{}, protoErr(ErrBadCommand, replyBadFormat)
		}
		return cmd, nil
	}
	if len(t) < 2 {
		return Command{}, protoErr(ErrBadCommand, replyBadFormat)
	}
	if cmd.Op == OpMetaSet {
		if len(t) < 3 {
			return Command{}, protoErr(ErrBadCommand, replyBadFormat)
		}
		n, ok := parseInt(t[2])
		if !ok || n < 0 || n > 1<<31-3 {
			return Command{}, protoErr(ErrBadCommand, replyBadChunk)
		}
		if !validKey(t[1]) || n > int64(maxValue) {
			reply, err := replyBadFormat, ErrBadKey
			if validKey(t[1]) {
				reply, err = replyTooLarge, ErrValueTooLarge
			}
			e := protoErr(err, reply)
			if n+2 <= maxSwallow {
				e.Swallow = int(n) + 2
			} else {
				e.Close = true
			}
			return Command{}, e
		}
		cmd.Bytes = int(n)
	} else if !validKey(t[1]) {
		return Command{}, protoErr(ErrBadKey, replyBadFormat)
	}
	for _, f := range t[2:] {
		if !validToken(f) {
			return Command{}, protoErr(ErrBadCommand, replyBadFormat)
		}
	}
	cmd.Keys = []string{string(t[1])}
	size := len(t) - 1
	for _, x := range t {
		size += len(x)
	}
	cmd.Line = make([]byte, 0, size)
	for i, x := range t {
		if i > 0 {
			cmd.Line = append(cmd.Line, ' ')
		}
		cmd.Line = append(cmd.Line, x...)
	}
	return cmd, nil
}

func withKey(cmd Command, k []byte) (Command, error) {
	if !validKey(k) {
		return Command{}, protoErr(ErrBadKey, replyBadFormat)
	}
	cmd.Keys = []string{string(k)}
	return cmd, nil
}

// tokenize splits line on spaces, as memcached does (runs of spaces count
// as one; a trailing CR or CRLF is dropped). The tokens alias line.
func tokenize(line []byte, toks [][]byte) [][]byte {
	n := len(line)
	if n > 0 && line[n-1] == '\n' {
		n--
	}
	if n > 0 && line[n-1] == '\r' {
		n--
	}
	line = line[:n]
	start := -1
	for i := 0; i < len(line); i++ {
		if line[i] == ' ' {
			if start >= 0 {
				toks = append(toks, line[start:i])
				start = -1
			}
		} else if start < 0 {
			start = i
		}
	}
	if start >= 0 {
		toks = append(toks, line[start:])
	}
	return toks
}

func cutNoReply(args [][]byte) ([][]byte, bool) {
	if n := len(args); n > 0 && string(args[n-1]) == "noreply" {
		return args[:n-1], true
	}
	return args, false
}

// validKey reports whether k is a key memcached accepts: mckey.Valid, the
// one definition the rules, the pool and the proxy share.
func validKey(k []byte) bool { return mckey.Valid(k) }

func validToken(b []byte) bool {
	for _, c := range b {
		if c < ' ' || c == 0x7f {
			return false
		}
	}
	return true
}

// parseUint parses a decimal unsigned number of at most bits bits.
func parseUint(b []byte, bits int) (uint64, bool) {
	if len(b) == 0 || len(b) > 20 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if n > (1<<64-1-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	if bits < 64 && n >= 1<<uint(bits) {
		return 0, false
	}
	return n, true
}

// parseInt parses a decimal signed number that fits in 32 bits, as
// memcached reads exptimes and lengths.
func parseInt(b []byte) (int64, bool) {
	neg := false
	if len(b) > 0 && (b[0] == '-' || b[0] == '+') {
		neg = b[0] == '-'
		b = b[1:]
	}
	n, ok := parseUint(b, 32)
	if !ok || n > 1<<31-1 {
		return 0, false
	}
	if neg {
		return -int64(n), true
	}
	return int64(n), true
}
