# Every target does its own set-up: a fresh clone needs only python3 (3.11+) and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf

.PHONY: setup proto proto-check lint test fuzz demo bench bench-quick clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

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
	$(BIN)/pytest -q

# The fuzzing suite's long mode: 20,000 generated requests per server (`make test` runs
# 2,000). TETHER_FUZZ_SEED=<seed> replays a run; TETHER_FUZZ_REQUESTS=<n> changes the count.
FUZZ_REQUESTS ?= 20000
fuzz: $(STAMP)
	TETHER_FUZZ_REQUESTS=$${TETHER_FUZZ_REQUESTS:-$(FUZZ_REQUESTS)} $(BIN)/pytest -q -s \
		--timeout 3600 tests/fuzz/test_fuzz_control.py tests/fuzz/test_fuzz_broker.py

demo: $(STAMP)
	$(BIN)/tether demo

# The peers (pgqueuer) are optional: without them (or PostgreSQL) their figure is skipped with a note.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	-$(BIN)/pip install --quiet -e '.[dev,bench]' && touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) .tether-demo .pytest_cache .mypy_cache .ruff_cache node_modules
