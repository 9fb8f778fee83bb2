# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.medfm-installed
export MEDFM_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test lint bench clean chromium

setup: $(STAMP)

# Reinstalls only when the dependency files change; the stamp makes a second run a no-op.
$(STAMP): pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch torchvision
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/medfm demo

test: setup chromium
	$(PY) -m pytest -q -n 2 --durations=15 tests

# The audit.html browser test needs headless Chromium (Debian package `chromium`). Installed only where it is
# missing, and only as root; `apt-get update` may fail offline, then the local package cache is used. Without
# it the browser test is skipped on a developer machine and fails in CI (CI=true).
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq || echo "apt-get update failed (offline?): installing from the package cache"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "note: $(CHROMIUM) missing and not root: run 'sudo apt-get install chromium' for the browser test"; fi; \
	fi

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
