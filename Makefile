# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.medfm-installed
export MEDFM_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test lint bench clean system-deps

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

test: setup system-deps
	$(PY) -m pytest -q -n 2 --durations=15 tests

# The browser tests need headless Chromium and its driver (Debian `chromium`, `chromium-driver`); the PACS
# tests need Orthanc with its DICOMweb plugin (`orthanc`, `orthanc-dicomweb`). Installed only where missing,
# and only as root; `apt-get update` may fail offline, then the local package cache is used. Without them
# those tests skip on a developer machine and fail in CI (CI=true).
SYSTEM_DEPS := /usr/bin/chromium:chromium /usr/bin/chromedriver:chromium-driver \
  /usr/sbin/Orthanc:orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb
system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do f=$${pair%%:*}; pkg=$${pair##*:}; \
	  [ -e $$f ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq || echo "apt-get update failed (offline?): installing from the package cache"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "note: missing$$missing and not root: run 'sudo apt-get install$$missing' for the browser/PACS tests"; fi; \
	fi

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
