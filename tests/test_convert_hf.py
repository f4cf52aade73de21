"""Converted weights give the same logits in HF transformers' Qwen3-MoE (the independent oracle)."""
import dataclasses

import pytest
import torch

from megatron_seed.config import ConfigError, MoEConfig
from megatron_seed.convert.hf import load_hf_checkpoint, save_hf_checkpoint
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from tests.model_utils import tiny_model
from tests.numerics import assert_close_rel

transformers = pytest.importorskip("transformers")


def qwen_like(**changes):
    return tiny_model(moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16), **changes)


@pytest.mark.parametrize("changes", [{}, {"num_dense_layers": 1, "dense_ffn_size": 24, "num_layers": 3}])
def test_hf_logits_match_and_round_trip(tmp_path, changes):
    cfg = qwen_like(**changes)
    ours = GPTModel(cfg, ParallelState.single())
    ours.init_weights(seed=3)
    save_hf_checkpoint(ours.state_dict(), cfg, str(tmp_path))
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert_close_rel(got, expected, 1e-5, "logits")

    cfg_back, sd_back = load_hf_checkpoint(str(tmp_path))
    assert dataclasses.replace(cfg_back, init_std=cfg.init_std, max_seq_len=cfg.max_seq_len) == dataclasses.replace(cfg, max_seq_len=cfg.max_seq_len)
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(sd_back[name], t, rtol=0, atol=0)


def test_shared_experts_are_refused_with_reason(tmp_path):
    cfg = tiny_model()  # has a shared expert
    ours = GPTModel(cfg, ParallelState.single())
    with pytest.raises(ConfigError, match="no shared experts"):
        save_hf_checkpoint(ours.state_dict(), cfg, str(tmp_path))
