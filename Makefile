# make run · make test · make bench · make lint — each sets up .venv itself.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := $(VENV)/.deps-installed
BUILD_DEPS := "setuptools>=77" wheel "Cython>=3.0" "grpcio-tools>=1.60" "numpy>=1.26"
HOST ?= 127.0.0.1
PORT ?= 7070
DATA ?= var/kvstore

.PHONY: run cluster test soak bench loadtest lint format build clean help

help:
	@echo "make run    create .venv, build, start a node on $(HOST):$(PORT) (data in $(DATA), demo table loaded)"
	@echo "make cluster  etcd + NODES node processes on this machine (default: one per CPU; data in var/cluster, Ctrl-C stops all)"
	@echo "make test   the same set-up, then the whole test suite"
	@echo "make soak   kill -9 one of 3 nodes (R=2) 10 times in a row under load: failed reads, acked writes lost"
	@echo "make bench  the benchmarks (results in bench/)"
	@echo "make loadtest  Locust against a fresh node (WORKLOAD= DIST= BATCH= USERS= TIME= ROWS=; reports in bench/locust/)"
	@echo "make lint   ruff format --check, ruff check, cython-lint on ext/, mypy on kvstore/ and ingest/"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(DEPS): pyproject.toml setup.py | $(PY)
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -e '.[test,dev,stream,serving]'
	touch $@

# Regenerates protobuf code and recompiles the Cython extension when their sources change.
build: $(DEPS)
	@$(PY) setup.py -q generate_protos build_ext --inplace 2>&1 | grep -v -e '^running' -e 'Compiling' -e 'Cythonizing' || true
	@$(PY) -c "import kvstore._codec, kvstore.v1.feature_store_pb2" || { echo "build failed"; exit 1; }

run: build
	$(VENV)/bin/kvstore serve --host $(HOST) --port $(PORT) --data $(DATA) --demo

# etcd on 127.0.0.1:2379, nodes n1..nN on ports 7071.. (docs/cluster.md, "Run a cluster");
# ARGS= passes more (python -m kvstore.cluster.local --help).
cluster: build
	@command -v etcd >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server)
	$(PY) -m kvstore.cluster.local $(if $(NODES),--nodes $(NODES)) $(ARGS)

# The stream-consumer tests run a real nats-server, the cluster tests a real etcd (Debian's packages).
test: build
	@command -v etcd >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server)
	@command -v nats-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server)
	@command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)
	$(VENV)/bin/pytest -q

# Issue 16's kill -9 fault over 10 kills in a row (python -m loadtests.kill_soak --help); ~2-3 min.
# Exit status 1 when a read failed or an acknowledged write was lost. ARGS= passes more.
soak: build
	@command -v etcd >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server)
	$(PY) -m loadtests.kill_soak --kills 10 $(ARGS)

# make bench (1M rows + a 10M-row bulk load + the RAM-capped run, ~12 min) · make bench QUICK=1
# (100k rows, ~2 min) · the cluster step runs etcd (one node process against N, N = cores;
# ARGS="--cluster-nodes 0" skips it) · ARGS= passes more (python -m loadtests.bench --help).
bench: build
	@command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)
	@command -v etcd >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server)
	$(PY) -m loadtests.bench $(if $(QUICK),--quick) $(ARGS)
	@# rows written online (the delta tier) against bulk-loaded ones, in-process (issue 17)
	$(PY) -m loadtests.tiers $(if $(QUICK),--rounds 3 --writes 0) --out $(if $(QUICK),bench/quick,bench)/tiers.json
	@# RAM capped at a third of Redis's (a memory cgroup: root only; exit status 2 = skipped); both
	@# tables in the plain format (zstd: python -m loadtests.memcap --formats zstd, docs/benchmarks.md)
	$(PY) -m loadtests.memcap --formats plain $(if $(QUICK),--rows 100000 --rounds 2 --out bench/quick) || test $$? -eq 2

# make loadtest WORKLOAD=C|B|A DIST=zipfian|uniform BATCH=1|10|100|1000 USERS=8 RATE= TIME=60s
# ROWS=100000: a node on 127.0.0.1, a bulk-loaded table, Locust headless; bench/locust/<run>*.
loadtest: build
	$(PY) -m loadtests.loadtest $(if $(WORKLOAD),--workload $(WORKLOAD)) \
		$(if $(DIST),--distribution $(DIST)) $(if $(BATCH),--batch-size $(BATCH)) \
		$(if $(USERS),--users $(USERS)) $(if $(RATE),--spawn-rate $(RATE)) \
		$(if $(TIME),--time $(TIME)) $(if $(ROWS),--rows $(ROWS)) $(ARGS)

# cython-lint (settings in ext/.cython-lint.toml) runs pycodestyle by name: the venv's.
# mypy runs as the suite runs it (tests/test__sourcecode.py): on a tree where ingest/ sits at
# kvstore/ingest, as installed; it reads the protobuf stubs that build generates.
lint: build
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/cython-lint ext
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test__sourcecode.py::test_mypy

format: $(DEPS)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build dist *.egg-info kvstore/*.so ext/*.c kvstore/v1/*_pb2*.py kvstore/v1/*_pb2.pyi
