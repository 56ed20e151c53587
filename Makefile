# cdcbackfill — see README.md. Every target works on a fresh machine: the
# tests and the demo start their own PostgreSQL (internal/pgtest).
GO        ?= go
BIN       := bin/cdcbackfill
PKGS      := ./...
TEST_TIMEOUT ?= 30m

.PHONY: build test vet lint bench demo chaos clean

build:
	$(GO) build -o $(BIN) ./cmd/cdcbackfill

vet:
	$(GO) vet $(PKGS)

lint: vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

test: build vet
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

bench: build
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x -timeout 60m ./bench/

# chaos: the randomized fault suite, long (make test runs 2 iterations).
# CHAOS_SEED=N replays a run; the seed and a summary table are printed.
chaos: build
	CHAOS_ITERATIONS=$${CHAOS_ITERATIONS:-20} $(GO) test -count=1 -run '^TestChaos$$' -v -timeout 60m ./cmd/cdcbackfill/

demo: build
	./$(BIN) demo

clean:
	rm -rf bin
