"""The planner's model-state bytes per rank equal what the trainer really allocates."""
import dataclasses

import pytest
import torch

from megatron_seed.config import ParallelConfig
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.plan.inputs import Assumptions, Workload
from megatron_seed.plan.layout import PlanLayout
from megatron_seed.plan.measured import measure, predicted
from megatron_seed.plan.memory import global_rank_memory, in_flight_chunks, zero1_shard
from megatron_seed.train.trainer import Trainer, lm_batch
from tests.model_utils import tiny_config, tiny_model

MODEL = tiny_model(num_layers=4, num_dense_layers=1, dense_ffn_size=32)
SEQ, GLOBAL_BATCH = 16, 4


def _allocated(rank: int, world: int, layout: PlanLayout) -> dict:
    cfg = tiny_config(MODEL, micro_batch_size=1, global_batch_size=GLOBAL_BATCH, seq_len=SEQ)
    cfg.parallel = dataclasses.replace(layout.parallel_config(zero1=True), overlap_grad_reduce=False)
    ps = ParallelState.build(cfg.parallel, world, rank)
    trainer = Trainer(cfg, ps)
    tokens = torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    rows = GLOBAL_BATCH // ps.dp_size
    trainer.train_step(lm_batch(tokens[ps.dp_rank * rows:(ps.dp_rank + 1) * rows]))
    params = [p for chunk in trainer.chunks for p in chunk.parameters()]
    return {
        "parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
        "optimizer": sum(t.numel() * t.element_size() for t in trainer.optimizer.state_tensors()),
    }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", [
    PlanLayout(tp=2, pp=2, ep=2, dp=2),
    PlanLayout(tp=4, pp=1, ep=2, dp=1),  # tp > kv heads: k/v replicated over tp; experts over edp=2
])
def test_model_state_bytes_equal_the_trainers(layout):
    allocated = run_distributed(_allocated, layout.world, layout)
    w = Workload(seq_len=SEQ, global_batch=GLOBAL_BATCH, precision="fp32")
    for rank, real in enumerate(allocated):
        planned = global_rank_memory(MODEL, layout, w, Assumptions(), rank)
        assert (planned.parameters, planned.gradients, planned.optimizer) == (real["parameters"], real["gradients"], real["optimizer"]), rank


def test_zero1_shards_match_the_optimizers_ranges():
    assert [zero1_shard(10, 4, r) for r in range(4)] == [3, 3, 3, 1]
    assert [zero1_shard(2, 4, r) for r in range(4)] == [1, 1, 0, 0]
    assert zero1_shard(0, 4, 0) == 0


def test_in_flight_micro_batches_follow_the_schedules():
    assert in_flight_chunks(PlanLayout(pp=1), 8, 0) == [0]
    assert [len(in_flight_chunks(PlanLayout(pp=4), 8, r)) for r in range(4)] == [4, 3, 2, 1]
    assert len(in_flight_chunks(PlanLayout(pp=4), 2, 0)) == 2  # fewer micro-batches than stages
    # interleaved, pp=2, vpp=2, 4 micro-batches: rank 0 warms up (2-0-1)*2 + (2-1)*2 = 4 forwards, plus one
    assert in_flight_chunks(PlanLayout(pp=2, vpp=2), 4, 0) == [0, 0, 1, 1, 0]



@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", [PlanLayout(), PlanLayout(pp=2)])
def test_predicted_activation_peak_within_25_percent_of_a_real_step(layout):
    measured = run_distributed(measure, layout.world, layout) if layout.world > 1 else [measure(0, 1, layout)]
    for rank, real in enumerate(measured):
        assert abs(predicted(layout, rank) / real - 1) <= 0.25, (rank, predicted(layout, rank), real)
