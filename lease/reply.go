package lease

import (
	"errors"
	"strconv"
	"strings"

	"github.com/pgcache/pgcache/mcpool"
)

// Fixed replies of the text protocol.
var (
	rEnd       = []byte("END\r\n")
	rStored    = []byte("STORED\r\n")
	rNotStored = []byte("NOT_STORED\r\n")
	rExists    = []byte("EXISTS\r\n")
	rNotFound  = []byte("NOT_FOUND\r\n")
	rDeleted   = []byte("DELETED\r\n")
	rTouched   = []byte("TOUCHED\r\n")
	rOK        = []byte("OK\r\n")
	rMN        = []byte("MN\r\n")
)

// crlf ends a line or a data block.
var crlf = []byte("\r\n")

// appendValueHeader appends the line that opens one item of a retrieval
// reply: "VALUE <key> <flags> <bytes> [<cas>]\r\n". The data and its
// CRLF follow.
func appendValueHeader(b []byte, key string, it *item, withCAS bool) []byte {
	b = append(b, "VALUE "...)
	b = append(b, key...)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(it.flags), 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, int64(len(it.value)), 10)
	if withCAS {
		b = append(b, ' ')
		b = strconv.AppendUint(b, it.cas, 10)
	}
	return append(b, '\r', '\n')
}

// appendLine appends s and CRLF.
func appendLine(b []byte, s string) []byte {
	b = append(b, s...)
	return append(b, '\r', '\n')
}

// storeReply maps an ms status to the text protocol's answer.
func storeReply(st mcpool.Status) []byte {
	switch st {
	case mcpool.StatusHD:
		return rStored
	case mcpool.StatusEX:
		return rExists
	case mcpool.StatusNF:
		return rNotFound
	}
	return rNotStored
}

// errorReply is the answer to a request the pool failed: memcached's own
// error line when it sent one, CLIENT_ERROR for a request the pool
// refused to send, SERVER_ERROR otherwise.
func errorReply(err error) string {
	var se *mcpool.ServerError
	if errors.As(err, &se) {
		if se.Msg == "" {
			return se.Kind
		}
		return se.Kind + " " + oneLine(se.Msg)
	}
	if errIsClient(err) {
		return replyBadFormat
	}
	return "SERVER_ERROR " + oneLine(err.Error())
}

// oneLine keeps s on one line of printable text, at most 200 bytes.
func oneLine(s string) string {
	if len(s) > 200 {
		s = s[:200]
	}
	return strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}

func formatUint(v uint64) string { return strconv.FormatUint(v, 10) }
func formatInt(v int64) string   { return strconv.FormatInt(v, 10) }
