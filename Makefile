# flare_jax: `make run` and `make test` set up .venv when needed, then run.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flare_jax-installed
export MUJOCO_GL ?= egl
export PYTHONUNBUFFERED := 1

.PHONY: run test test-slow bench setup clean-venv

# The stamp is refreshed whenever the pinned requirements or setup.py change.
$(STAMP): requirements.txt constraints.txt setup.py scripts/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.default_run

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

bench: $(STAMP)
	$(PY) -m experiments.bench encoders

clean-venv:
	rm -rf $(VENV)
