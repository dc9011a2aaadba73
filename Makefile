# flare_jax: `make run` and `make test` set up .venv when needed, then run.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flare_jax-installed
export MUJOCO_GL ?= egl
export PYTHONUNBUFFERED := 1
# tcmalloc keeps freed pages: XLA's large per-call CPU buffers stop page-faulting (flare_jax/runtime.py)
# (recursive '=': evaluated when a recipe runs, i.e. after setup_env.sh may have installed it)
export LD_PRELOAD = $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))

.PHONY: run test test-slow bench setup clean-venv

# The stamp is refreshed whenever the pinned requirements or setup.py change.
$(STAMP): requirements.txt constraints.txt setup.py scripts/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.default_run

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" --durations=15 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

bench: $(STAMP)
	$(PY) -m experiments.bench encoders

clean-venv:
	rm -rf $(VENV)
