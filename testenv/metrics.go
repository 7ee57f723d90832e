package testenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// ErrNoMetric is a metric a /metrics page does not export.
var ErrNoMetric = errors.New("testenv: metric not exported")

var metricsClient = &http.Client{Timeout: 2 * time.Second}

// Metrics reads the Prometheus text page at http://addr/metrics (a
// daemon's HTTP listener, host:port) and returns every metric's value,
// summed over its label sets.
func Metrics(ctx context.Context, addr string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := metricsClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("testenv: %s/metrics: %s", addr, resp.Status)
	}
	return parseMetrics(resp.Body)
}

// Metric is one metric's value from Metrics, or ErrNoMetric.
func Metric(ctx context.Context, addr, name string) (float64, error) {
	m, err := Metrics(ctx, addr)
	if err != nil {
		return 0, err
	}
	v, ok := m[name]
	if !ok {
		return 0, fmt.Errorf("%w: %s", ErrNoMetric, name)
	}
	return v, nil
}

// parseMetrics reads samples ("name{labels} value [timestamp]"), skipping
// comments and lines it cannot read.
func parseMetrics(r io.Reader) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.IndexAny(line, "{ ")
		if i <= 0 {
			continue
		}
		name, rest := line[:i], line[i:]
		if rest[0] == '{' {
			j := strings.LastIndexByte(rest, '}')
			if j < 0 {
				continue
			}
			rest = rest[j+1:]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		out[name] += v
	}
	return out, sc.Err()
}
