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
SEED ?= 0
PYTEST_ARGS ?=

.PHONY: env ops test test-unit test-integration demo clean sanitize

$(UV_HOME)/bin/uv:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(UV_HOME) uv

# Environment from the lock; re-syncing an up-to-date env takes ~1 s. Bytecode is compiled
# here, once (~20 s), because a Python started with PYTHONDONTWRITEBYTECODE=1 (set on this
# machine) never writes it: every process, each Ray worker included, would otherwise compile
# Ray, pandas and torchvision from source on import (`import ray.train` 4.1 s -> 1.5 s).
env: $(if $(shell command -v uv 2>/dev/null),,$(UV_HOME)/bin/uv)
	$(UV) sync --frozen --extra test --quiet --compile-bytecode
	$(PY) -m compileall -q -j 0 model pipeline jobs
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
	$(VENV)/bin/maskray demo --out $(OUT) --seed $(SEED)

# The CPU RoIAlign op built with ASan + UBSan (any UB report fatal) in its own cache folder,
# running the op tests. libasan must be loaded first: it is preloaded into Python.
SANITIZE_TESTS ?= tests/unit/test_ops.py tests/unit/test_ops_hostile.py tests/unit/test_ops_property.py tests/unit/test_ops_multilevel.py
SANITIZE_ENV = MASKRAY_OPS_SANITIZE=1 MASKRAY_OPS_DIR=$(CURDIR)/build/ops-sanitize CUDA_VISIBLE_DEVICES= \
  LD_PRELOAD="$$($${CXX:-c++} -print-file-name=libasan.so) $$($${CXX:-c++} -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
sanitize: env
	$(SANITIZE_ENV) $(PY) -m model.build --no-cuda
	$(SANITIZE_ENV) $(PY) -m pytest $(SANITIZE_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(UV_HOME) build *.egg-info
