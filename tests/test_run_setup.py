"""start_run's CPU threads: every core for a lone process, unless OMP_NUM_THREADS says how many (processes
sharing the cores, such as the test suite's CLI runs or several benchmark seeds, each ask for fewer: with a
thread per core in each, their spinning threads wait on each other)."""
import os

import torch

from megatron_seed.config import load_config
from megatron_seed.train.run_setup import start_run


def test_start_run_uses_every_core_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    cfg = load_config("tiny")
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        start_run(cfg)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        start_run(cfg)
        assert torch.get_num_threads() == max(1, os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
