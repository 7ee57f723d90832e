// Package lifecycle is the soft stop that every long-lived role shares:
// Drain asks Run to stop taking input and finish what it has, and waits
// until Run has returned. It leaves what a role does on a soft stop to the
// role.
package lifecycle

import (
	"context"
	"fmt"
	"sync"
)

// Soft is a role's soft stop. The zero value is not usable: use New.
type Soft struct {
	name string
	once sync.Once
	soft chan struct{} // closed by Drain
	done chan struct{} // closed by Stopped
	stop sync.Once
}

// New returns the soft stop of the role called name (for errors).
func New(name string) *Soft {
	return &Soft{name: name, soft: make(chan struct{}), done: make(chan struct{})}
}

// Draining is closed once Drain was called: Run stops taking input.
func (s *Soft) Draining() <-chan struct{} { return s.soft }

// Stopped tells Drain that Run has returned; Run defers it. It is safe
// to call more than once.
func (s *Soft) Stopped() { s.stop.Do(func() { close(s.done) }) }

// Drain is the soft stop: it returns when Run has, or ctx's error when ctx
// ends first. It may be called more than once, and before Run.
func (s *Soft) Drain(ctx context.Context) error {
	s.once.Do(func() { close(s.soft) })
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%s: drain: %w", s.name, ctx.Err())
	}
}
