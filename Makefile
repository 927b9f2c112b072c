# Two commands for a fresh machine: `make demo` and `make test`. Both (re)build .venv only when the
# requirements changed since the last successful install.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_output
# Tests run in 2 pytest-xdist workers: most tests keep one core busy, so one process left the second core idle
# (CPU time 1.2x the wall time); 2 workers take about 21 min on 2 cores. --dist loadfile keeps each test file in one
# worker, so module fixtures are made once; each worker limits torch to its share of the cores (tests/conftest.py).
# PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: setup demo test clean deploy-env

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

# the serving environments too: their tests skip without them, so CI (a clean checkout) must build them
test: setup label-env deploy-env
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# MONAI Deploy apps (tools/deploy): their own venv, reusing .venv's packages (see requirements-deploy.txt for why).
# No pip of its own: .venv's pip (found through the .pth) installs into .deploy-env, as does monai itself.
DEPLOY_VENV := .deploy-env
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

$(DEPLOY_STAMP): $(STAMP) requirements-deploy.txt
	@test -x $(DEPLOY_VENV)/bin/python || "$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv --without-pip $(DEPLOY_VENV)
	@echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(DEPLOY_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_project_venv.pth"
	@echo "Installing requirements-deploy.txt into $(DEPLOY_VENV) (only when it changed)..."
	@$(DEPLOY_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-deploy.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(DEPLOY_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps --ignore-installed \
		"monai==$$($(PY) -c 'import importlib.metadata as m; print(m.version("monai"))')" 2>&1 | { grep -v "^WARNING: Location" || true; }
	@touch $(DEPLOY_STAMP)

deploy-env: $(DEPLOY_STAMP)

# MONAI Label app (tools/label_app): its own venv, reusing .venv's packages (see tools/label_app/requirements.txt
# for why). --no-deps: that file is the whole pinned closure; --ignore-installed: its pins land in .label-env even
# where .venv has another version (pip never touches .venv from here). Prints the venv's path.
.PHONY: label-env
LABEL_VENV := .label-env
LABEL_STAMP := $(LABEL_VENV)/.installed
LABEL_REQS := tools/label_app/requirements.txt

$(LABEL_STAMP): $(STAMP) $(LABEL_REQS)
	@test -x $(LABEL_VENV)/bin/python || "$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv --without-pip $(LABEL_VENV)
	@echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(LABEL_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_project_venv.pth"
	@echo "Installing $(LABEL_REQS) into $(LABEL_VENV) (only when it changed)..."
	@$(LABEL_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps --ignore-installed -r $(LABEL_REQS) 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(LABEL_VENV)/bin/python -c "import monailabel.app, common.bundle.serve" > /dev/null  # what start_server imports
	@touch $(LABEL_STAMP)

label-env: $(LABEL_STAMP)
	@echo "$(abspath $(LABEL_VENV))"

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
