# One entry point for the habits: make run | test | lint | format | mypy | bench | all
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install run test test-fast lint format mypy bench bench-quick all clean

# The same install the Dockerfile runs (pinned runtime deps, then the package), plus dev tools.
$(VENV)/.installed: pyproject.toml requirements.lock $(wildcard .ci/install-*-tools)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	for tool in .ci/install-*-tools; do VENV=$(VENV) $$tool || exit 1; done
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m devtools.run

test: install
	$(BIN)/python -m pytest -n 2 -q

test-fast: install
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

lint: install
	$(BIN)/ruff check ingest devtools tests bench
	$(BIN)/ruff format --check ingest devtools tests bench

format: install
	$(BIN)/ruff check --fix ingest devtools tests bench
	$(BIN)/ruff format ingest devtools tests bench

mypy: install
	$(BIN)/mypy

bench: install
	VENV=$(VENV) bench/install.sh
	$(BIN)/python -m bench

bench-quick: install
	VENV=$(VENV) bench/install.sh
	$(BIN)/python -m bench --quick

all: lint mypy test

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
