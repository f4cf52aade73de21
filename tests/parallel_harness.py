"""Parallel-equals-serial harness: train a tiny GPT-MoE under a layout, compare with one process.

Every layout trains the same model (4 layers: 1 dense, 3 MoE with 4 experts and a
shared expert), from the same seed, on the same global batches: data-parallel rank
``d`` takes rows ``[d * B/dp, (d+1) * B/dp)`` of each global batch, cut into micro-
batches of one row, exactly the micro-batches the single process runs in that order.
Workers return per-step loss and grad norm and every parameter gathered to its full
shape (by global name), so the caller can compare against :func:`reference_run`.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache

import pytest
import torch

from megatron_seed.config import ParallelConfig
from megatron_seed.parallel.sharding import gather_full
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer, lm_batch
from tests.model_utils import tiny_config, tiny_model
from tests.numerics import rel_err

STEPS = 2
GLOBAL_BATCH = 4
SEQ = 16
RTOL = 1e-5


def equivalence_config(parallel: dict):
    model = tiny_model(num_layers=4, num_dense_layers=1, dense_ffn_size=32)
    cfg = tiny_config(model, micro_batch_size=1, global_batch_size=GLOBAL_BATCH, seq_len=SEQ, steps=STEPS, adam_eps=1e-4)
    cfg.parallel = dataclasses.replace(ParallelConfig(), **parallel)
    return cfg


def global_batches() -> list:
    gen = torch.Generator().manual_seed(42)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]


def full_parameters(trainer: Trainer) -> dict:
    """Every parameter of this rank's chunks at its full shape, by global name (collective)."""
    return {name: gather_full(p, trainer.ps).numpy().copy() for chunk in trainer.chunks for name, p in chunk.named_parameters()}


def train(parallel: dict, ps: ParallelState) -> dict:
    trainer = Trainer(equivalence_config(parallel), ps)
    rows = GLOBAL_BATCH // ps.dp_size
    history, aux = [], []
    for tokens in global_batches():
        local = tokens[ps.dp_rank * rows:(ps.dp_rank + 1) * rows]
        metrics = trainer.train_step(lm_batch(local))
        history.append((metrics["loss"], metrics["grad_norm"]))
        aux.append(metrics["moe_aux_loss"])
    # the aux-loss metric is that of the last micro-batch, which the last dp rank shares with one process
    return {"history": history, "aux": aux if ps.dp_rank == ps.dp_size - 1 else None, "params": full_parameters(trainer)}


def train_worker(rank: int, world: int, parallel: dict) -> dict:
    """``run_distributed`` entry: build the groups of ``parallel`` and train."""
    cfg = equivalence_config(parallel)
    return train(parallel, ParallelState.build(cfg.parallel, world, rank))


@lru_cache(maxsize=None)
def reference_run() -> dict:
    """The single-process run every layout must reproduce."""
    return train({}, ParallelState.single())


def assert_matches_reference(results: list) -> None:
    """Losses, grad norms and every updated parameter of every rank match one process."""
    ref = reference_run()
    seen: set = set()
    for rank, out in enumerate(results):
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(out["history"], ref["history"])):
            assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), f"rank {rank} step {step}: loss {loss} != {ref_loss}"
            assert abs(norm - ref_norm) <= RTOL * abs(ref_norm), f"rank {rank} step {step}: grad norm {norm} != {ref_norm}"
        if out["aux"] is not None:
            assert out["aux"] == pytest.approx(ref["aux"], rel=RTOL), f"rank {rank}: MoE aux-loss metric (mean over all layers)"
        for name, value in out["params"].items():
            assert name in ref["params"], f"rank {rank}: unexpected parameter {name}"
            err = rel_err(value, ref["params"][name])
            assert err <= RTOL, f"rank {rank}: {name} differs from one process, relative error {err:.2e}"
            seen.add(name)
    missing = set(ref["params"]) - seen
    assert not missing, f"no rank holds {sorted(missing)}"
