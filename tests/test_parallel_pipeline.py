"""Pipeline schedules: aux losses reach every stage, forward-only log-probs, bad schedules named."""
import dataclasses

import pytest
import torch

from megatron_seed.parallel.pipeline import forward_backward
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import Layout, ParallelState
from megatron_seed.parallel.tensor_parallel import vocab_parallel_log_probs
from megatron_seed.train.trainer import Trainer, lm_batch, split_microbatches
from tests.parallel_harness import equivalence_config, global_batches
from tests.numerics import assert_close_rel


def _setup(parallel: dict, world: int, rank: int, aux_coef: float = 1e-3) -> tuple:
    cfg = equivalence_config(parallel)
    cfg.model.moe = dataclasses.replace(cfg.model.moe, aux_loss_coef=aux_coef)
    ps = ParallelState.build(cfg.parallel, world, rank) if world > 1 else ParallelState.single()
    trainer = Trainer(cfg, ps)
    microbatches = split_microbatches(lm_batch(global_batches()[0]), 1)
    return cfg, ps, trainer, microbatches


def aux_only_worker(rank: int, world: int, parallel: dict) -> dict:
    """Backward of a loss the logits do not contribute to: only the MoE aux losses give gradients."""
    cfg, ps, trainer, microbatches = _setup(parallel, world, rank, aux_coef=1e-2)
    for chunk in trainer.chunks:
        chunk.set_aux_loss_scale(1.0 / len(microbatches))

    def zero_loss(logits_BSV, mb):
        return (logits_BSV * 0).sum(), {}

    forward_backward(trainer.chunks, microbatches, zero_loss, ps, cfg.parallel.pp_schedule)
    return {
        name: float(p.grad.abs().sum()) if p.grad is not None else 0.0
        for chunk in trainer.chunks for name, p in chunk.named_parameters() if "router" in name
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("parallel", [{"pp": 2}, {"pp": 2, "virtual_pp": 2, "pp_schedule": "interleaved"}])
def test_aux_loss_gradients_reach_every_stage(parallel):
    per_rank = run_distributed(aux_only_worker, 2, parallel)
    routers = {name: grad for rank in per_rank for name, grad in rank.items()}
    assert all(per_rank), "every stage holds MoE layers"
    assert sorted(routers) == [f"layers.{i}.mlp.router.weight" for i in (1, 2, 3)]
    assert all(g > 0 for g in routers.values()), routers


def log_probs_worker(rank: int, world: int, parallel: dict) -> list:
    """Forward-only pass returning per-token log-probs of each micro-batch (last stage)."""
    cfg, ps, trainer, microbatches = _setup(parallel, world, rank)

    def log_probs(logits_BSV, mb):
        return torch.zeros(()), vocab_parallel_log_probs(logits_BSV, mb["labels_BS"], ps).numpy()

    stats = forward_backward(trainer.chunks, microbatches, log_probs, ps, cfg.parallel.pp_schedule, forward_only=True)
    assert all(p.grad is None for chunk in trainer.chunks for p in chunk.parameters())
    return stats


@pytest.mark.timeout(120)
@pytest.mark.parametrize("parallel", [{"pp": 2}, {"pp": 2, "virtual_pp": 2, "pp_schedule": "interleaved"}])
def test_forward_only_returns_last_stage_outputs(parallel):
    reference = log_probs_worker(0, 1, {})
    first, last = run_distributed(log_probs_worker, 2, parallel)
    assert first == []
    assert len(last) == len(reference) == 4
    for got, want in zip(last, reference):
        assert_close_rel(got, want, 1e-5, "log-probs")


def _two_stage_state() -> ParallelState:
    return ParallelState.unconnected(Layout(2, 1, 1, 1, 2, 1, 1, 1), False, torch.device("cpu"))


def test_bad_schedules_are_named():
    ps = _two_stage_state()
    mbs = [{"input_ids_BS": torch.zeros(1, 4, dtype=torch.long)}] * 3
    with pytest.raises(ValueError, match="3 micro-batches per step is not a multiple of pp=2"):
        forward_backward([torch.nn.Linear(1, 1)] * 2, mbs, None, ps, "interleaved")
    with pytest.raises(ValueError, match="gpipe schedule runs one model chunk per rank; got 2"):
        forward_backward([torch.nn.Linear(1, 1)] * 2, mbs, None, ps, "gpipe")
    with pytest.raises(ValueError, match="interleaved schedule needs parallel.virtual_pp > 1"):
        forward_backward([torch.nn.Linear(1, 1)], mbs, None, ps, "interleaved")
    with pytest.raises(ValueError, match="schedule 'zb' is unknown"):
        forward_backward([torch.nn.Linear(1, 1)], mbs, None, ps, "zb")
