"""Parallel equals serial: 2 training steps of a tiny GPT-MoE under each layout.

Losses, global grad norms (clipping counts every parameter once across tp/pp/ep/dp)
and every updated parameter, gathered to its full shape, match the single-process
run of the same model, data and seed to a relative error of 1e-5 (fp32).
"""
import pytest

from megatron_seed.parallel.spawn import run_distributed
from tests.parallel_harness import assert_matches_reference, train_worker

LAYOUTS = {
    "tp2": (2, {"tp": 2}),
    "tp2_sequence_parallel": (2, {"tp": 2, "sequence_parallel": True}),
    "pp2_1f1b": (2, {"pp": 2, "pp_schedule": "1f1b"}),
    "pp2_gpipe": (2, {"pp": 2, "pp_schedule": "gpipe"}),
    "pp2_interleaved": (2, {"pp": 2, "virtual_pp": 2, "pp_schedule": "interleaved"}),
    "pp2_uneven_stages": (2, {"pp": 2, "pp_layers": [1, 3]}),
    "pp4_1f1b": (4, {"pp": 4}),  # middle stages: distinct prev and next ranks
    "pp2_interleaved_dp2": (4, {"pp": 2, "virtual_pp": 2, "pp_schedule": "interleaved"}),  # M == pp: all warm-up
    "dp2_zero1": (2, {"zero1": True}),
    "dp2_replicated_optimizer": (2, {"zero1": False}),
    "dp2_reduce_after_backward": (2, {"overlap_grad_reduce": False}),
    "ep2_dp2": (4, {"ep": 2}),
    "tp2_sp_ep2_dp2": (4, {"tp": 2, "sequence_parallel": True, "ep": 2}),
    "tp2_ep2_etp2": (4, {"tp": 2, "ep": 2, "etp": 2}),
    "tp2_pp2_dp2": (8, {"tp": 2, "pp": 2}),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name):
    world, parallel = LAYOUTS[name]
    assert_matches_reference(run_distributed(train_worker, world, parallel))
