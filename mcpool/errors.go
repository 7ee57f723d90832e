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
	// The request may or may not have been applied.
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
