package lifecycle

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestDrain(t *testing.T) {
	s := New("role")
	ran := make(chan struct{})
	go func() {
		defer close(ran)
		defer s.Stopped()
		<-s.Draining()
	}()
	if err := s.Drain(context.Background()); err != nil {
		t.Fatalf("Drain: got %v; want nil", err)
	}
	<-ran
	if err := s.Drain(context.Background()); err != nil {
		t.Fatalf("second Drain: got %v; want nil", err)
	}

	stuck := New("stuck")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := stuck.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain of a Run that never returns: got %v; want DeadlineExceeded", err)
	}
}
