"""The parameter counter equals sum(p.numel()) of instantiated models."""
import dataclasses

import pytest
import torch

from megatron_seed.config import MoEConfig, ModelConfig, load_config
from megatron_seed.model.gpt import GPTModel
from megatron_seed.params import count_parameters
from megatron_seed.parallel.state import ParallelState


def _numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = GPTModel(cfg, ParallelState.single())
    return sum(p.numel() for p in model.parameters())


BASE = ModelConfig(vocab_size=96, hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                   moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"num_dense_layers": 1, "dense_ffn_size": 48},
        {"qk_norm": False},
        {"tie_embeddings": True},
        {"value_head": True},
        {"moe": MoEConfig(num_experts=6, top_k=3, ffn_size=8, num_shared_experts=2, shared_ffn_size=12)},
    ],
)
def test_counter_matches_instantiated_model(changes):
    cfg = dataclasses.replace(BASE, **changes)
    assert count_parameters(cfg).total == _numel(cfg)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_counter_matches_presets(preset):
    cfg = load_config(preset).model
    assert count_parameters(cfg).total == _numel(cfg)


def test_seed_200b_targets():
    counts = count_parameters(load_config("seed-200b-a20b").model)
    assert abs(counts.total - 200e9) / 200e9 <= 0.03
    assert abs(counts.activated - 20e9) / 20e9 <= 0.05


def test_activated_counts_top_k_experts_only():
    cfg = BASE
    counts = count_parameters(cfg)
    expert = 3 * cfg.hidden_size * cfg.moe.ffn_size
    assert counts.total - counts.activated == cfg.num_layers * (cfg.moe.num_experts - cfg.moe.top_k) * expert
