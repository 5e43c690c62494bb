# `make test` and `make run` bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LINT_PATHS := syncd tests alembic $(wildcard bench)

.PHONY: test run run-daemon lint typecheck services bench bench-ingest reliability clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

services:
	bash scripts/ensure-postgres.sh

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) services lint typecheck
	$(BIN)/pytest

# The whole system on loopback: the simulator, a local ERP and the daemon on SQLite.
run: $(STAMP)
	$(BIN)/syncd demo $(DEMO_ARGS)

# The daemon alone with config/syncd.dev.toml (state in ./.state/).
run-daemon: $(STAMP)
	bash scripts/dev-run.sh

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# The reliability suite at full scale (CI runs it small, inside `make test`).
reliability: $(STAMP) services
	SYNCD_RELIABILITY=full $(BIN)/pytest tests/reliability $(PYTEST_ARGS)

# syncd beside the integration guide's Flask + gunicorn + Redis design and a bare handler.
# Needs wrk (apt-get install wrk), PostgreSQL and Redis; BENCH_ARGS=--help lists the knobs.
bench: $(BENCH_STAMP) services
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

# Needs wrk (apt-get install wrk) and PostgreSQL; BENCH_ARGS=--help lists the knobs.
bench-ingest: $(STAMP) services
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .state
