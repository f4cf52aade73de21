# Two entry points for a fresh machine (Python 3.11, no GPU):
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch pulls gigabytes of CUDA wheels.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]" triton
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/megatron-seed demo

test: setup
	$(PY) -m pytest -q
