package lease

import (
	"fmt"
	"net/http"

	"github.com/pgcache/pgcache/mcpool"
)

// HealthHandler answers /healthz: 200 and "ok" while the server serves and
// at least one of the pool's servers is usable; 503 while it drains or
// when every server's breaker is open. The body lists each server's
// breaker state. servers may be nil (mcpool.Pool.Stats otherwise).
func (s *Server) HealthHandler(servers func() []mcpool.ServerStats) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		var stats []mcpool.ServerStats
		if servers != nil {
			stats = servers()
		}
		usable := len(stats) == 0
		for _, st := range stats {
			if st.State != mcpool.BreakerOpen {
				usable = true
			}
		}
		status, msg := http.StatusOK, "ok"
		switch {
		case s.draining.Load():
			status, msg = http.StatusServiceUnavailable, "draining"
		case !usable:
			status, msg = http.StatusServiceUnavailable, "every memcached server is down"
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(status)
		fmt.Fprintln(w, msg)
		for _, st := range stats {
			fmt.Fprintf(w, "server %s breaker %s conns %d\n", st.Addr, st.State, st.Conns)
		}
	})
}
