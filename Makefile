# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.medfm-installed
export MEDFM_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test lint bench clean

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

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
