package lease

import (
	"errors"
	"fmt"
)

// Sentinel errors. Test with errors.Is.
var (
	// ErrUnknownCommand: the line names no command this proxy knows.
	ErrUnknownCommand = errors.New("lease: unknown command")
	// ErrBadCommand: a known command with malformed arguments.
	ErrBadCommand = errors.New("lease: bad command line format")
	// ErrBadKey: a key longer than 250 bytes or holding CR, LF or NUL.
	ErrBadKey = errors.New("lease: invalid key")
	// ErrValueTooLarge: a data block longer than Config.MaxValueBytes.
	ErrValueTooLarge = errors.New("lease: value too large")
	// ErrLineTooLong: a command line longer than the configured limit.
	ErrLineTooLong = errors.New("lease: line too long")
	// ErrBadDataChunk: a data block not followed by CRLF.
	ErrBadDataChunk = errors.New("lease: bad data chunk")
	// ErrBinaryProtocol: the client speaks memcached's binary protocol.
	ErrBinaryProtocol = errors.New("lease: binary protocol not supported")
	// ErrTooManyConns: the connection limit was reached.
	ErrTooManyConns = errors.New("lease: too many open connections")
	// ErrConfig: Config.Validate found a problem.
	ErrConfig = errors.New("lease: invalid config")
	// ErrFlushRefused: flush_all is configured to be refused.
	ErrFlushRefused = errors.New("lease: flush_all refused by configuration")
)

// ProtocolError is a bad command line, with what to answer the client and
// how to get back in step with its stream.
type ProtocolError struct {
	// Err is one of the sentinels above.
	Err error
	// Reply is the line to send back, without CRLF: "ERROR",
	// "CLIENT_ERROR <msg>" or "SERVER_ERROR <msg>".
	Reply string
	// Swallow is how many bytes that follow the line (a data block and its
	// CRLF) must be read and discarded to stay in step. 0: none.
	Swallow int
	// Close says the stream cannot be resynchronised: the connection is
	// closed after the reply.
	Close bool
}

func (e *ProtocolError) Error() string { return fmt.Sprintf("%v (reply %q)", e.Err, e.Reply) }

func (e *ProtocolError) Unwrap() error { return e.Err }

// Replies used for errors, as memcached 1.6.18 words them.
const (
	replyError        = "ERROR"
	replyBadFormat    = "CLIENT_ERROR bad command line format"
	replyBadDelete    = "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]"
	replyBadDelta     = "CLIENT_ERROR invalid numeric delta argument"
	replyBadExptime   = "CLIENT_ERROR invalid exptime argument"
	replyTooLarge     = "SERVER_ERROR object too large for cache"
	replyLineTooLong  = "CLIENT_ERROR line too long"
	replyBadChunk     = "CLIENT_ERROR bad data chunk"
	replyBinary       = "CLIENT_ERROR binary protocol not supported; speak the text protocol"
	replyTooManyConns = "SERVER_ERROR too many open connections"
	replyFlushRefused = "SERVER_ERROR flush_all is disabled on this proxy"
)

func protoErr(err error, reply string) *ProtocolError {
	return &ProtocolError{Err: err, Reply: reply}
}
