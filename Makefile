# Two promises: `make demo` and `make test` work on a fresh machine with only Python 3.11+ and make.
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The first Python 3.11+ on PATH.
PYTHON := $(shell for candidate in python3.13 python3.12 python3.11 python3; do \
	$$candidate -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$candidate; break; }; \
	done)

.PHONY: demo test test-fast dev bench

$(INSTALLED): pyproject.toml
	@test -n "$(PYTHON)" || { echo "upstack-flows needs Python 3.11 or newer on PATH (python3.11, python3.12, ...)."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

# The demo records its runs where `make dev` looks: the same Dagster instance, landing folder and warehouse.
demo: $(INSTALLED)
	DAGSTER_HOME=$(CURDIR)/dagster_home $(BIN)/upstack demo

# Two workers (pytest-xdist), one per core of the machines this runs on: the suite waits on processes and servers.
# loadfile: a test file runs whole on one worker, so a module-scoped fixture is built once and its tests run in order.
test: $(INSTALLED)
	$(BIN)/pytest -n 2 --dist loadfile

# The unit and journey tests in about a minute and a half: every test but those marked slow (pyproject.toml), on both cores as
# `make test` runs them all (a file's tests share one worker: their module fixtures are built once).
test-fast: $(INSTALLED)
	$(BIN)/pytest -m "not slow" -n 2 --dist loadfile

# `upstack report`'s page in a real browser: Debian's Chromium (`apt-get install -y chromium`), driven by Playwright
# from the `browser` extra. Kept out of `make test`, which needs only Python.
.PHONY: test-browser
BROWSER_INSTALLED := $(VENV)/.installed-browser
$(BROWSER_INSTALLED): $(INSTALLED) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev,browser]"
	touch $(BROWSER_INSTALLED)

test-browser: $(BROWSER_INSTALLED)
	$(BIN)/pytest tests/browser

dev: $(INSTALLED)
	DAGSTER_HOME=$(CURDIR)/dagster_home $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: $(INSTALLED)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/identity.py
	$(BIN)/python bench/delivery.py
	$(BIN)/python bench/scale.py
