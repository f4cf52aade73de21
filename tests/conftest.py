"""Fixtures shared by the test modules, and the thread budget of a parallel (xdist) run."""
import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n W`` each of the W workers gets cores/W torch threads (at least 1),
    and so do the CLI processes it starts (OMP_NUM_THREADS, unless the caller set it):
    W workers at the default of one thread per core would ask for W times the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def one_thread():
    """One torch thread: tiny matmuls on a shared 2-core box only contend with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
