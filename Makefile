# Two entry points for a fresh machine (Python 3.11, no GPU):
#   make demo           set up .venv and run the main job: the RL recipe on configs/rl-tiny.yaml
#   make demo-pretrain  set up .venv and run the pretraining demo (tiny preset, bundled corpus)
#   make test           set up .venv and run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# one pytest worker per core (at most 4: each runs multi-process tests of up to 8 ranks);
# worksteal hands a module's tests to one worker first, so module fixtures mostly run once
PYTEST_ARGS ?= -q -n auto --maxprocesses 4 --dist worksteal
# The CPU build of torch; an unpinned torch pulls gigabytes of CUDA wheels.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo demo-pretrain test

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]" triton
	touch $@

setup: $(VENV)/.installed
	@# bubblewrap isolates the code sandbox (rl/rewards/sandbox.py); without it the sandbox uses rlimits only
	@if ! command -v bwrap >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	  apt-get install -y -q bubblewrap >/dev/null 2>&1; } || echo "note: bubblewrap not installed; code sandbox uses rlimits only"; fi

demo: setup
	rm -rf runs/rl
	$(VENV)/bin/megatron-seed rl --preset rl-tiny --set train.save_dir=runs/rl

demo-pretrain: setup
	$(VENV)/bin/megatron-seed demo

test: setup
	@# pytest exits 5 when it collected no test: a failure, said out loud (make reports any failure as 2)
	$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -ne 5 ] || echo "FAILED: pytest collected no tests" >&2; exit $$rc; }
