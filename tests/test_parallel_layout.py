"""Bad layouts fail in ParallelState.build before any process group exists, naming the numbers."""
import pytest
import torch.distributed as dist

from megatron_seed.config import ParallelConfig
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import LayoutError, ParallelState


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        (ParallelConfig(tp=4), 6, r"world size 6 is not divisible by tp\*cp\*pp = 4\*1\*1 = 4"),
        (ParallelConfig(tp=2, dp=4), 4, r"parallel.dp=4 but world size 4 / \(tp\*cp\*pp = 2\) = 2"),
        (ParallelConfig(pp=2, ep=4), 4, r"ep\*etp = 4\*1 = 4 does not divide the 2 ranks of a pipeline stage"),
    ],
)
def test_build_rejects_layout_before_creating_groups(parallel, world, message):
    assert not dist.is_initialized()  # new_group would raise first if build tried to create one
    with pytest.raises(LayoutError, match=message):
        ParallelState.build(parallel, world=world, rank=0)


def groups_worker(rank: int, world: int) -> dict:
    ps = ParallelState.build(ParallelConfig(tp=2, pp=2, ep=2), world, rank)
    return {name: ps.group_ranks[name] for name in ("tp", "dp", "pp", "ep", "edp", "model_parallel")}


@pytest.mark.timeout(120)
def test_groups_follow_megatron_rank_order():
    """tp fastest, then dp, then pp; experts re-read each stage's tp*dp ranks as ep x edp."""
    by_rank = run_distributed(groups_worker, 8)
    assert by_rank[0] == {
        "tp": [0, 1], "dp": [0, 2], "pp": [0, 4], "ep": [0, 1], "edp": [0, 2], "model_parallel": [0, 1, 4, 5],
    }
    assert by_rank[7]["tp"] == [6, 7] and by_rank[7]["dp"] == [5, 7] and by_rank[7]["pp"] == [3, 7]
    assert by_rank[7]["ep"] == [6, 7] and by_rank[7]["edp"] == [5, 7]
