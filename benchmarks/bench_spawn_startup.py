"""Start-up of a multi-process test's ranks: forked from a torch-importing forkserver vs spawned.

``run_distributed`` (megatron_seed/parallel/spawn.py) forks its ranks from a forkserver that
has imported torch; the alternative, the start method it used before, is a fresh interpreter
per rank (``spawn``) that imports torch itself. Each rank here does what a parallel-equals-
serial test's rank does before its first step: import the trainer, join the process group,
build a tp=world layout, and reports the CPU seconds its process has used (process_time:
a forked child starts at zero, a spawned one counts its interpreter start-up and imports).
CPU seconds are what a loaded machine disturbs least and what a 2-core CI pays::

    .venv/bin/python benchmarks/bench_spawn_startup.py --world 4 --repeats 3

Prints the CPU seconds of all ranks per job and the wall time per job for each start method,
side by side in one run, and their ratio.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time

from megatron_seed.parallel import spawn


def startup_worker(rank: int, world: int) -> float:
    from megatron_seed.config import ParallelConfig
    from megatron_seed.parallel.state import ParallelState
    from megatron_seed.train.trainer import Trainer  # noqa: F401  (what a test's rank imports)

    ParallelState.build(ParallelConfig(tp=world), world, rank)
    return time.process_time()


class _SpawnOnly:
    """Stands in for ``spawn.mp``: every context is the ``spawn`` one (fresh interpreters)."""

    @staticmethod
    def get_context(method: str) -> multiprocessing.context.BaseContext:
        return multiprocessing.get_context("spawn")


def measure(world: int, repeats: int) -> tuple[float, float]:
    """(CPU seconds of all ranks, wall seconds) per job, averaged over ``repeats`` jobs."""
    cpu = wall = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        cpu += sum(spawn.run_distributed(startup_worker, world))
        wall += time.perf_counter() - start
    return cpu / repeats, wall / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spawn.run_distributed(startup_worker, 1)  # starts the forkserver: once per test process
    forked = measure(args.world, args.repeats)
    real_mp, spawn.mp = spawn.mp, _SpawnOnly
    try:
        spawned = measure(args.world, args.repeats)
    finally:
        spawn.mp = real_mp
    print(f"world={args.world} repeats={args.repeats}")
    for name, (cpu, wall) in (("forkserver", forked), ("spawn", spawned)):
        print(f"{name}: {cpu:.2f} CPU-s of all ranks per job, {wall:.2f} s wall per job")
    print(f"spawn / forkserver: CPU {spawned[0] / forked[0]:.2f}x, wall {spawned[1] / forked[1]:.2f}x")


if __name__ == "__main__":
    main()
