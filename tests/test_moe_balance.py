"""Aux-loss-free balancing (DeepSeek-V3 bias rule) evens the load of a skewed router."""
from __future__ import annotations

import torch

from megatron_seed.config import ModelConfig, MoEConfig
from megatron_seed.parallel.sharding import init_parameters
from megatron_seed.parallel.state import ParallelState
from moe.layer import MoELayer
from moe.router import update_expert_biases


def _skewed_batch() -> torch.Tensor:
    return torch.randn(4, 64, 16) + 0.5  # positive mean: the boosted router rows win


def _train_steps(layer: MoELayer, steps: int, update: bool) -> torch.Tensor:
    """Expert load summed over ``steps`` forwards (one optimizer step each)."""
    load = torch.zeros(layer.moe_cfg.num_experts)
    for _ in range(steps):
        with torch.no_grad():
            layer(_skewed_batch())
        load += layer.last_stats["tokens_per_expert"]
        if update:
            update_expert_biases(layer)
    return load


def test_bias_updates_even_out_a_skewed_load() -> None:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=8, top_k=2, ffn_size=8, score_function="sigmoid", aux_loss_coef=0.0, bias_update_rate=0.01)
    ps = ParallelState.single()
    layer = MoELayer(ModelConfig(hidden_size=16, moe=moe), ps)
    init_parameters(layer, 0, ps, 0.3)
    with torch.no_grad():
        layer.router.weight[:2] += 1.0  # experts 0 and 1 attract most tokens
    before = _train_steps(layer, 50, update=False)
    layer.router.expert_load.zero_()
    _train_steps(layer, 250, update=True)
    after = _train_steps(layer, 50, update=True)
    assert before.max() / before.mean() > 2.5, before  # the input really is skewed
    assert after.max() / after.mean() < 1.2, after
    assert layer.router.expert_bias[:2].max() < layer.router.expert_bias[2:].min()  # popular experts pushed down
