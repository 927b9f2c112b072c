# Two commands for a fresh machine: `make demo` and `make test`. Both (re)build .venv only when the
# requirements changed since the last successful install.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_output
# pytest-xdist is not used: the suite is sized for 2 cores and shares temp phantom data per session.
PYTEST_ARGS ?=

.PHONY: setup demo test clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing requirements into $(VENV) (only when requirements changed)..."
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	@# the project itself (common, tools), editable: no run needs PYTHONPATH, from any folder
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m tools demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
