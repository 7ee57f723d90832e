# pgcache: multi-datacenter cache invalidation for Postgres and memcached.
GO          ?= go
PKGS        := ./...
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
TEST_TIMEOUT ?= 40m
BIN         := bin

.PHONY: all setup build test check fmt vet staticcheck tidy race demo env bench chaos compat fuzz clean

all: build

setup:
	@bash scripts/setup.sh

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# The tests start real servers (Postgres, NATS, memcached) through testenv/.
test: setup
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

check: fmt vet staticcheck tidy race

fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet $(PKGS)

staticcheck:
	$(GO) run $(STATICCHECK) $(PKGS)

tidy:
	$(GO) mod tidy -diff

race: setup
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

# The local environment alone: Postgres primary, a replica, NATS and
# memcached per datacenter, until Ctrl-C.
env: setup build
	$(BIN)/testenv

# The two-datacenter demo (see README).
demo: setup build
	$(BIN)/demo

bench: setup build
	bash scripts/bench.sh

# Every chaos scenario in its full form against the real daemons; writes
# CHAOS.md and fails on any FAIL verdict. The short form runs in make test
# (TestChaosShort in ./chaos).
chaos: setup
	bash scripts/chaos/chaos.sh

# Real clients' own suites (pymemcache's integration tests, gomemcache's
# TestLocalhost, a pylibmc script of every text command) against leaseproxy,
# with memcached direct as the reference in the same run; fails on a proxy
# failure not in scripts/compat/known-differences.txt.
compat:
	bash scripts/compat/compat.sh

fuzz:
	@for p in $$(grep -rl '^func Fuzz' --include='*_test.go' . | xargs -n1 dirname | sort -u); do \
	  for f in $$(grep -h '^func Fuzz' $$p/*_test.go | sed 's/func \(Fuzz[A-Za-z0-9_]*\).*/\1/'); do \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 30s $$p || exit 1; done; done

clean:
	rm -rf $(BIN)
