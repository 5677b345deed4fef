# One entry point for the habits: make run | test | lint | format | mypy | bench | all
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install run test test-fast test-debug lint format mypy bench bench-quick all clean

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

# The suite on uvloop, the loop the service runs (INGEST_TEST_LOOP=asyncio for the standard one).
test: install
	$(BIN)/python -m pytest -n 2 -q

# Without the tests marked slow: real fault injection (tests/faults/: servers killed and
# restarted), the browser, Hypothesis and schemathesis fuzzing, the first-run harness.
test-fast: install
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# The suite once more in asyncio debug mode: never-awaited coroutines, unclosed transports,
# calls from the wrong thread, slow callbacks. On the standard loop, as asyncpg's `make test`
# does, so CI covers both loops; the services tests start (`serve`, uvloop) inherit the variable.
# Without the tests marked timing (time bounds under load), which debug mode's cost breaks.
test-debug: install
	PYTHONASYNCIODEBUG=1 INGEST_TEST_LOOP=asyncio $(BIN)/python -m pytest -n 2 -q -m "not timing"

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

all: lint mypy test test-debug

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
