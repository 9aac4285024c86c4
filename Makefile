# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
# uv (bootstrapped below) installs the locked environment; pip is not used for the
# project because pip here prefers a local CPU-only torch file that breaks torchvision.
SHELL := /bin/bash
PYTHON ?= python3
UV_HOME := .tools/uv
UV := $(shell command -v uv 2>/dev/null || echo $(UV_HOME)/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: env ops test test-unit test-integration demo clean

$(UV_HOME)/bin/uv:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(UV_HOME) uv

# Environment from the lock; re-syncing an up-to-date env takes ~1 s.
env: $(if $(shell command -v uv 2>/dev/null),,$(UV_HOME)/bin/uv)
	$(UV) sync --frozen --extra test --quiet
	$(MAKE) --no-print-directory ops

# Compile the RoIAlign op ahead of time (cached; a no-op when sources are unchanged).
ops:
	$(PY) -m model.build

test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: env
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: env
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

demo: env
	$(VENV)/bin/maskray demo --out $(OUT)

clean:
	rm -rf $(VENV) $(UV_HOME) build *.egg-info
