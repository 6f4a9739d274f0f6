# Every target does its own set-up: a fresh clone needs only python3 (3.11+) and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf

.PHONY: setup proto proto-check lint test demo bench bench-quick clean

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
