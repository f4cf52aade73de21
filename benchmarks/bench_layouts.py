"""Training throughput of the tiny GPT-MoE under each parallel layout vs one process (CPU, gloo).

Every layout trains the same model (the ``tiny`` preset) on the same global batch;
each rank is one process with one torch thread, so on a machine with fewer cores than
processes the ratio says more about CPU sharing than about the layout. For the
record, not a target::

    .venv/bin/python benchmarks/bench_layouts.py               # layouts of 1-2 processes
    .venv/bin/python benchmarks/bench_layouts.py --max-world 8 # plus tp x dp, ep x dp, tp x pp x dp

Prints tokens/s of each layout next to a one-process run measured just before it
(same invocation), and their ratio; then tokens per CPU-second (all ranks' CPU time
summed), which a loaded machine disturbs less: it is the work a layout adds
(communication, duplicated compute, smaller GEMMs) per token.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.distributed as dist

from megatron_seed.config import ParallelConfig, load_config
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer, lm_batch

LAYOUTS = [  # (name, world, parallel overrides)
    ("tp=2", 2, {"tp": 2}),
    ("tp=2 + sequence parallel", 2, {"tp": 2, "sequence_parallel": True}),
    ("pp=2 1F1B", 2, {"pp": 2}),
    ("pp=2 interleaved (2 virtual)", 2, {"pp": 2, "virtual_pp": 2, "pp_schedule": "interleaved"}),
    ("dp=2 ZeRO-1", 2, {}),
    ("ep=2 (dense dp=2)", 2, {"ep": 2}),
    ("tp=2 x dp=2", 4, {"tp": 2}),
    ("ep=2 x edp=2 (dense dp=4)", 4, {"ep": 2}),
    ("tp=2 x pp=2 x dp=2", 8, {"tp": 2, "pp": 2}),
]


def bench_worker(rank: int, world: int, parallel: dict, global_batch: int, micro_batch: int, warmup: int, steps: int) -> tuple:
    """(wall seconds of the slowest rank, CPU seconds summed over ranks) for ``steps`` steps after ``warmup``."""
    cfg = load_config("tiny", overrides=[f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro_batch}"])
    cfg.parallel = dataclasses.replace(ParallelConfig(), **parallel)
    ps = ParallelState.build(cfg.parallel, world, rank)
    trainer = Trainer(cfg, ps)
    rows = global_batch // ps.dp_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (global_batch, cfg.train.seq_len + 1), generator=gen) for _ in range(2)]

    def step(i: int) -> None:
        trainer.train_step(lm_batch(batches[i % 2][ps.dp_rank * rows:(ps.dp_rank + 1) * rows]))

    for i in range(warmup):
        step(i)
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(i)
    wall = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpu)
    return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-world", type=int, default=2, help="skip layouts needing more processes")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    seq_len = load_config("tiny").train.seq_len
    tokens = args.global_batch * seq_len * args.steps
    print(f"tiny preset, global batch {args.global_batch} x {seq_len} tokens, micro-batch {args.micro_batch}, {args.steps} timed steps")
    print(f"{'layout':<30} {'procs':>5} {'tokens/s':>9} {'1 process':>9} {'ratio':>6} | {'tok/CPU-s':>9} {'1 process':>9} {'ratio':>6}")

    def rate(world: int, parallel: dict) -> tuple:
        wall, cpu = run_distributed(bench_worker, world, parallel, args.global_batch, args.micro_batch, args.warmup, args.steps, timeout_s=900)[0]
        return tokens / wall, tokens / cpu

    for name, world, parallel in LAYOUTS:
        if world > args.max_world:
            continue
        # the one-process run is repeated next to each layout so load drift on a shared machine cancels
        (base_wall, base_cpu), (wall, cpu) = rate(1, {}), rate(world, parallel)
        print(
            f"{name:<30} {world:>5} {wall:>9.0f} {base_wall:>9.0f} {wall / base_wall:>6.2f} | {cpu:>9.0f} {base_cpu:>9.0f} {cpu / base_cpu:>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
