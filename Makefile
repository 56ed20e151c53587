# cdcbackfill — see README.md. Every target works on a fresh machine: the
# tests and the demo start their own PostgreSQL (internal/pgserver), and get
# its binaries once when none are installed.
GO        ?= go
BIN       := bin/cdcbackfill
PKGS      := ./...
TEST_TIMEOUT ?= 30m

.PHONY: build test test-matrix vet lint bench bench-long profile demo chaos clean

build:
	$(GO) build -o $(BIN) ./cmd/cdcbackfill

vet:
	$(GO) vet $(PKGS)

lint: vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

test: build vet
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

# test-matrix: a subset of the suite on each supported PostgreSQL version
# (CDCBACKFILL_PG_VERSION; fetched once when not installed): the stream's
# package (MATRIX_PKGS), the tests in MATRIX_RUN, the chaos suite at 2
# iterations, and a smoke run (-short) of
# the benchmarks in MATRIX_BENCH. Every version runs even when one fails;
# the summary says which failed and the exit status is non-zero. A DSN in
# CDCBACKFILL_TEST_DSN is ignored here: it would pin every block to one
# server.
MATRIX_VERSIONS ?= 15 16 17 18
MATRIX_RUN      ?= ^(TestFullStory|TestNewColumnsBecomeFirstClass|TestNotNullViolationHoldsVerify|TestApproveHandsOverAtItsCommit|TestKeyTypes|TestReplicaIdentity|TestChaos|TestServerFeatures|TestCutoverSeesEveryWrite|TestApplicationOwnsNewColumnsAfterApprove)$$
MATRIX_PKGS     ?= ./cdc/
MATRIX_BENCH    ?= ^BenchmarkBackfill$$
MATRIX_TIMEOUT  ?= 20m

test-matrix: build
	@failed=""; all_start=$$(date +%s); \
	for v in $(MATRIX_VERSIONS); do \
	  echo "=== PostgreSQL $$v: tests $(MATRIX_RUN) (chaos: 2 iterations), bench $(MATRIX_BENCH) -short"; \
	  start=$$(date +%s); ok=yes; \
	  export CDCBACKFILL_PG_VERSION=$$v CHAOS_ITERATIONS=2; unset CDCBACKFILL_TEST_DSN; \
	  $(GO) test -count=1 -run '^TestServer$$' ./internal/pgtest/ || ok=no; \
	  $(GO) test -count=1 -timeout $(MATRIX_TIMEOUT) $(MATRIX_PKGS) || ok=no; \
	  $(GO) test -count=1 -timeout $(MATRIX_TIMEOUT) -run '$(MATRIX_RUN)' ./cmd/cdcbackfill/ || ok=no; \
	  $(GO) test -count=1 -short -timeout $(MATRIX_TIMEOUT) -run '^$$' -bench '$(MATRIX_BENCH)' -benchtime 1x ./bench/ || ok=no; \
	  took=$$(( $$(date +%s) - start )); \
	  if [ $$ok = yes ]; then echo "=== PostgreSQL $$v: passed in $${took}s"; \
	  else echo "=== PostgreSQL $$v: FAILED in $${took}s"; failed="$$failed $$v"; fi; \
	done; \
	echo "=== matrix: $(MATRIX_VERSIONS) in $$(( $$(date +%s) - all_start ))s; failed:$${failed:- none}"; \
	[ -z "$$failed" ]

bench: build
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x -timeout 60m ./bench/

# bench-long: the backfill against a single UPDATE at 1M and 10M rows in
# one run (BENCH_ROWS), so the ratios sit side by side: rows/s, WAL per
# row, CPU per row by role, each method's VACUUM, batch p99, peak RSS and
# plan's estimate, then a summary with the targets. About 12 minutes on
# 15 and 16 on 17 (one more setup) on 2 cores, 3 GB of disk besides the
# WAL; CDCBACKFILL_PG_VERSION=17 for 17. Levers: BENCH_RUNS (3), BENCH_AUTOVACUUM=1 (the table's
# autovacuum on during the runs), BENCH_SLEEP (backfill.sleep, e.g. 0s).
BENCH_LONG_ROWS ?= 1000000,10000000

bench-long: build
	BENCH_ROWS=$(BENCH_LONG_ROWS) $(GO) test -count=1 -run '^$$' -bench '^BenchmarkBackfill$$' -benchtime 1x -timeout 180m ./bench/

# profile: the daemon's CPU per write in sync at one rate (RATE, DUR), with
# a CPU profile; about a minute (see bench/profile-sync.sh).
profile: build
	bench/profile-sync.sh

# chaos: the randomized fault suite, long (make test runs 2 iterations).
# CHAOS_SEED=N replays a run; the seed and a summary table are printed.
chaos: build
	CHAOS_ITERATIONS=$${CHAOS_ITERATIONS:-20} $(GO) test -count=1 -run '^TestChaos$$' -v -timeout 60m ./cmd/cdcbackfill/

demo: build
	./$(BIN) demo

clean:
	rm -rf bin
