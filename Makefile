# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
# Everything they need is installed here: the virtualenv and its pip packages, and
# redis-server from Debian's packages for the tests.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_INDEX_ARGS ?= --sizes 100000,1000000 --exact-qps 50
LOADTEST_ARGS ?= --redis --concurrency 1,10,50 --rate 0.25max,half-max --duration 8s

.PHONY: help install demo test redis java ghz loadtest swap-load proto quality bench-index chaos clean

help:
	@echo "make demo     generate data, train, build the index, serve, query (end to end)"
	@echo "make test     run the test suite (installs what it needs)"
	@echo "make proto    regenerate the Python stubs from proto/"
	@echo "make loadtest ghz load test: echo ceiling, naive baseline, server (LOADTEST_ARGS=--quick)"
	@echo "make swap-load  a hot swap under open-loop load, beside a steady run (SWAP_LOAD_ARGS)"
	@echo "make bench-index  index build/recall/QPS at 100k and 1M items (BENCH_INDEX_ARGS)"
	@echo "make chaos    faults under load: Redis down/slow, overload, SIGTERM, bad publish, swap, watcher, soak (CHAOS_ARGS)"
	@echo "make quality  retrieval quality on MovieLens vs the plain TFRS baseline (../shared/data)"

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[serve,train,prepare,proto,test,bench]"
	touch $@

install: $(STAMP)

redis:
	@if command -v redis-server >/dev/null 2>&1; then \
		echo "redis-server: $$(command -v redis-server)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing redis-server from Debian's packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
		echo "redis-server is missing: install it (e.g. sudo apt-get install redis-server) and rerun"; \
		exit 1; \
	fi

# The preparation job runs on Apache Spark, which needs a Java runtime (17 or later).
java:
	@if command -v java >/dev/null 2>&1; then \
		echo "java: $$(command -v java)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing a Java runtime from Debian's packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null; \
	else \
		echo "java is missing: install a Java 17+ runtime (e.g. sudo apt-get install openjdk-17-jre-headless) and rerun"; \
		exit 1; \
	fi

demo: install java
	$(BIN)/two-tower demo --workdir demo-run

# ghz is installed with `go install` of a pinned release (.ci/install-ghz.sh); when that
# cannot be done the ghz smoke test is skipped with its reason, the rest of the suite runs.
ghz:
	@bash .ci/install-ghz.sh || echo "ghz could not be installed: the ghz smoke test will be skipped"

test: install redis java ghz
	$(BIN)/python -m pytest -q

loadtest: install ghz
	$(BIN)/python -m benchmarks.loadtest $(LOADTEST_ARGS)

# 1M items as in the load-test table of docs/benchmarks.md; the second index is built once, then reused.
SWAP_LOAD_ARGS ?= --items 1000000 --clusters 1000 --content-dims 8 --index-spec IVF4096,SQ8 \
	--swap-spec IVF4096,Flat --rate 300 --duration 20s
swap-load: install redis ghz
	$(BIN)/python -m benchmarks.swap_load $(SWAP_LOAD_ARGS)

proto: install
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/retrieval/v1/retrieval.proto

quality: install
	$(BIN)/python -m benchmarks.quality $(QUALITY_ARGS)

bench-index: install
	$(BIN)/python -m benchmarks.index_scale $(BENCH_INDEX_ARGS)

# Every scenario against a real server on loopback; the soak runs 30 minutes by default.
CHAOS_ARGS ?= --soak-seconds 1800
chaos: install redis
	$(BIN)/python -m benchmarks.chaos $(CHAOS_ARGS)

clean:
	rm -rf demo-run build *.egg-info
