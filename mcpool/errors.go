package mcpool

import (
	"context"
	"errors"
	"net"
)

// Sentinel errors. Test with errors.Is; classify with Retryable.
var (
	// ErrClosed: the Pool or Conn was closed.
	ErrClosed = errors.New("mcpool: closed")
	// ErrServerDown: the server's connection is broken or cannot be made.
	// Requests already in flight on a broken connection also get it: they
	// may or may not have been applied.
	ErrServerDown = errors.New("mcpool: server down")
	// ErrBreakerOpen: the server's breaker is open; the request was not sent.
	ErrBreakerOpen = errors.New("mcpool: breaker open")
	// ErrTimeout: the request's deadline passed before its response came.
	// The request may or may not have been applied. The error is a
	// *TimeoutError, which says where the request was (TimeoutWhereOf).
	ErrTimeout = errors.New("mcpool: timeout")
	// ErrBadKey: the key is empty, longer than 250 bytes, or holds a
	// space, CR, LF or NUL (which memcached's text protocol cannot carry
	// either). Nothing was sent.
	ErrBadKey = errors.New("mcpool: invalid key")
	// ErrBadRequest: a request or flag is malformed, or a value is larger
	// than allowed. Nothing was sent.
	ErrBadRequest = errors.New("mcpool: invalid request")
	// ErrProtocol: the server sent something that is not a meta response.
	// The connection is closed.
	ErrProtocol = errors.New("mcpool: protocol error")
	// ErrConfig: Config.Validate found a problem.
	ErrConfig = errors.New("mcpool: invalid config")
)

// TimeoutWhere says where a request was when its deadline passed. It
// decides whether the timeout counts against the server's breaker: only
// TimeoutSilent does. A client too busy to send its requests, or to read
// the answers the server keeps sending, is not a sign that the server
// failed.
type TimeoutWhere int

const (
	// TimeoutQueued ("queued"): the request was never written to the
	// server's socket. It waited for the first connection, for a
	// connection slot (MaxInFlight), or in the write buffer behind a
	// write under way. Not a failure of the server; not counted as sent.
	TimeoutQueued TimeoutWhere = iota + 1
	// TimeoutLate ("late"): the request was written, nothing came back
	// on its connection since, but it was written less than half its
	// timeout (Config.Timeout/2) before the deadline: it spent its time
	// queued in the client, and the server had it too briefly for its
	// silence to mean anything. Not a failure of the server.
	TimeoutLate
	// TimeoutAnswering ("answering"): the request was written, and since
	// then its connection received bytes from the server (the responses
	// to earlier requests, or the start of its own), or the kernel holds
	// bytes the client has yet to read. The server is alive; the client
	// asked more of it than one timeout allows, or was too busy to read.
	// Not a failure of the server.
	TimeoutAnswering
	// TimeoutSilent ("silent"): the request was written, and nothing came
	// back on its connection since: the server is dead, black-holed (a
	// stopped process, a partition) or takes longer than the timeout to
	// answer anything, for at least half the timeout. A failure, counted
	// by the breaker.
	TimeoutSilent
)

// String returns the label of w: "queued", "late", "answering" or
// "silent".
func (w TimeoutWhere) String() string {
	switch w {
	case TimeoutQueued:
		return "queued"
	case TimeoutLate:
		return "late"
	case TimeoutAnswering:
		return "answering"
	case TimeoutSilent:
		return "silent"
	}
	return "unknown"
}

// TimeoutError is the error of a request whose deadline (the ctx's, or
// Config.Timeout) passed before its response came. It wraps ErrTimeout
// and Err (context.DeadlineExceeded).
type TimeoutError struct {
	Where TimeoutWhere
	Err   error
}

func (e *TimeoutError) Error() string {
	return "mcpool: timeout (" + e.Where.String() + "): " + e.Err.Error()
}

// Unwrap returns ErrTimeout and Err.
func (e *TimeoutError) Unwrap() []error { return []error{ErrTimeout, e.Err} }

// TimeoutWhereOf returns where the request of a timeout error was, or 0
// when err holds no *TimeoutError.
func TimeoutWhereOf(err error) TimeoutWhere {
	var te *TimeoutError
	if errors.As(err, &te) {
		return te.Where
	}
	return 0
}

// timeoutErrs are the errors of requests that outlived Config.Timeout,
// their ctx having no deadline, by where they were (no allocation).
var timeoutErrs = [...]error{
	TimeoutQueued:    &TimeoutError{Where: TimeoutQueued, Err: context.DeadlineExceeded},
	TimeoutLate:      &TimeoutError{Where: TimeoutLate, Err: context.DeadlineExceeded},
	TimeoutAnswering: &TimeoutError{Where: TimeoutAnswering, Err: context.DeadlineExceeded},
	TimeoutSilent:    &TimeoutError{Where: TimeoutSilent, Err: context.DeadlineExceeded},
}

// ServerError is an error line sent by memcached: ERROR, CLIENT_ERROR <msg>
// or SERVER_ERROR <msg>.
type ServerError struct {
	Kind string // "ERROR", "CLIENT_ERROR" or "SERVER_ERROR"
	Msg  string
}

func (e *ServerError) Error() string {
	if e.Msg == "" {
		return "mcpool: server replied " + e.Kind
	}
	return "mcpool: server replied " + e.Kind + " " + e.Msg
}

// Retryable reports whether the same request may succeed if sent again
// later: the server was down, its breaker open, the request timed out, the
// connection broke or memcached answered SERVER_ERROR (out of memory, busy).
// A cancelled ctx, a closed pool, a bad key or request and CLIENT_ERROR are
// not retryable. Note that a retried delete, set or arithmetic may apply
// twice when the first attempt reached the server.
func Retryable(err error) bool {
	if err == nil {
		return false
	}
	switch {
	case errors.Is(err, ErrClosed), errors.Is(err, ErrBadKey), errors.Is(err, ErrBadRequest),
		errors.Is(err, ErrConfig), errors.Is(err, context.Canceled):
		return false
	case errors.Is(err, ErrServerDown), errors.Is(err, ErrBreakerOpen), errors.Is(err, ErrTimeout),
		errors.Is(err, ErrProtocol), errors.Is(err, context.DeadlineExceeded):
		return true
	}
	var se *ServerError
	if errors.As(err, &se) {
		return se.Kind == "SERVER_ERROR"
	}
	var ne net.Error
	return errors.As(err, &ne)
}
