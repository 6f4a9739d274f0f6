# Every target does its own set-up: a fresh clone needs only python3 (3.11+) and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf

.PHONY: setup proto proto-check lint test test-browser fuzz flood chaos chaos-ci chaos-replicas demo bench bench-quick clean \
	image container-test

# One progress line instead of pip's output; the full log stays in $(VENV)/setup.log
# and its tail is shown when the install fails.
$(STAMP): pyproject.toml
	@echo "setting up $(VENV): virtualenv and pip install -e '.[dev]' (a minute or two; log in $(VENV)/setup.log)"
	@$(PY) -m venv $(VENV)
	@$(BIN)/pip install --upgrade pip > $(VENV)/setup.log 2>&1 \
		&& $(BIN)/pip install -e '.[dev]' >> $(VENV)/setup.log 2>&1 \
		|| { tail -n 40 $(VENV)/setup.log; echo "setup failed: see $(VENV)/setup.log"; exit 1; }
	@touch $(STAMP)
	@echo "$(VENV) is ready"

setup: $(STAMP)

proto: $(STAMP)
	PYTHON=$(BIN)/python scripts/genproto.sh

# Fails when the committed generated code differs from what protos/ produce.
proto-check: $(STAMP)
	PYTHON=$(BIN)/python scripts/check-proto.sh

$(BUF):
	npm install --no-audit --no-fund --silent >/dev/null

lint: $(STAMP) $(BUF)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy
	cd protos && ../$(BUF) lint

test: $(STAMP)
	PYTHON=$(BIN)/python scripts/check-proto.sh
	$(BIN)/pytest -q -m "not chaos and not browser and not container"

# The operator console in a real browser (tests/browser/): Playwright drives Debian's
# Chromium (/usr/bin/chromium, or TETHER_CHROMIUM); `.ci/run` installs it when missing.
# Never `playwright install`: no browser is downloaded.
test-browser: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m browser tests/browser

# The fuzzing suite's long mode: 20,000 generated requests per server (`make test` runs
# 2,000). TETHER_FUZZ_SEED=<seed> replays a run; TETHER_FUZZ_REQUESTS=<n> changes the count.
FUZZ_REQUESTS ?= 20000
fuzz: $(STAMP)
	TETHER_FUZZ_REQUESTS=$${TETHER_FUZZ_REQUESTS:-$(FUZZ_REQUESTS)} $(BIN)/pytest -q -s \
		--timeout 3600 tests/fuzz/test_fuzz_control.py tests/fuzz/test_fuzz_broker.py

# The flood test's long mode: 100,000 header-only streams against a sidecar process
# (`make test` runs 10,000). TETHER_FLOOD_REPORT=<file> collects the figures as JSON lines.
FLOOD_CALLS ?= 100000
flood: $(STAMP)
	TETHER_FLOOD_CALLS=$${TETHER_FLOOD_CALLS:-$(FLOOD_CALLS)} $(BIN)/pytest -q -s \
		--timeout 3600 tests/flood/test_flood.py

# The chaos suite (tests/chaos/, docs/testing.md): real processes under seeded faults.
# chaos-ci: the CI mode (a few minutes per seed). It replays fixed schedules: 617235, and
# 667509, which once ended a task with no final receipt (fixed; issue 14). TETHER_CHAOS_SEED=
# <seed> replays one seed; CHAOS_CI_SEEDS=random draws a fresh one.
# chaos: the long mode, at least 200 faults over 400 tasks per seed; CHAOS_SEEDS="1 2 3".
CHAOS_SEEDS ?= 1 2 3
CHAOS_CI_SEEDS ?= 617235 667509
chaos-ci: $(STAMP)
	@set -e; for seed in $${TETHER_CHAOS_SEED:-$(CHAOS_CI_SEEDS)}; do \
		if [ "$$seed" = random ]; then seed=""; fi; \
		echo "chaos-ci: seed $${seed:-random}"; \
		TETHER_CHAOS_SEED=$$seed $(BIN)/pytest -q -s -p no:cacheprovider tests/chaos; \
	done

chaos: $(STAMP)
	$(BIN)/python tests/chaos/run_chaos.py $(foreach s,$(CHAOS_SEEDS),--seed $(s))

# Three replicas on PostgreSQL, four sidecars failing over between them, at least 200
# faults per seed including replicas paused inside transactions and pg_terminate_backend,
# a policy update mid-run (docs/operations.md, "Running several replicas").
chaos-replicas: $(STAMP)
	$(BIN)/python tests/chaos/run_chaos.py --replicas $(foreach s,$(CHAOS_SEEDS),--seed $(s))

demo: $(STAMP)
	$(BIN)/tether demo

# The container image and the container test (rootful Podman; docs/deploy.md, "Podman").
# `make image` builds $(IMAGE) from sidecar/Dockerfile on BASE_IMAGE, or on a base made
# from Debian's packages when that cannot be pulled, and writes build/container/sbom.json.
# CONTAINERS_CONF: the Podman settings these machines need (runc, cgroupfs, host network).
IMAGE ?= localhost/tether:0.1.0
BASE_IMAGE ?= python:3.11-slim
CONTAINERS_CONF ?= $(CURDIR)/sidecar/podman/containers.conf
export CONTAINERS_CONF

image:
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) scripts/container-image.sh

# Plays sidecar/k8s/deployment.yaml (and sidecar/compose.yaml) against a containerised
# control plane; not part of `make test`. Fails (never skips) under CI=true.
CONTAINER_STAMP := $(VENV)/.container-installed
$(CONTAINER_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,container]' && touch $(CONTAINER_STAMP)

container-test: $(STAMP) $(CONTAINER_STAMP) image
	TETHER_IMAGE=$(IMAGE) $(BIN)/pytest -q -s -p no:cacheprovider -m container --timeout 1200 tests/container

# The peers (pgqueuer) are optional: without them (or PostgreSQL) their figure is skipped with a note.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	-$(BIN)/pip install --quiet -e '.[dev,bench]' && touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) .tether-demo .chaos .pytest_cache .mypy_cache .ruff_cache node_modules
