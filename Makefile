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

demo: build
	./$(BIN) demo

clean:
	rm -rf bin
