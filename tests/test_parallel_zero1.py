"""ZeRO-1: fp32 master weights and Adam moments are sharded over data parallel."""
import pytest

from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer
from tests.parallel_harness import equivalence_config


def state_bytes_worker(rank: int, world: int, parallel: dict) -> int:
    cfg = equivalence_config(parallel)
    ps = ParallelState.build(cfg.parallel, world, rank) if world > 1 else ParallelState.single()
    return Trainer(cfg, ps).optimizer.state_bytes()


@pytest.mark.timeout(120)
def test_optimizer_state_per_rank_halves_with_dp2():
    one = state_bytes_worker(0, 1, {})
    sharded = run_distributed(state_bytes_worker, 2, {"zero1": True})
    replicated = run_distributed(state_bytes_worker, 2, {"zero1": False})
    assert replicated == [one, one]
    for per_rank in sharded:
        # ceil-split ranges: at most one element per bucket of padding on a rank
        assert abs(per_rank / one - 0.5) < 0.01, (per_rank, one)
    assert sum(sharded) == one
