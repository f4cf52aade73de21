"""Every preset exports to Hugging Face; transformers is the independent oracle.

Per family (Qwen3-MoE: no shared experts; GLM-4.5-MoE: shared experts, sigmoid routing with
a score-correction bias, group-limited top-k, leading dense layers), a random model built
*in transformers* from the config we emit is imported into ours (same logits, fp32 max abs
<= 1e-4) and exported back (every tensor bitwise equal). The critic's value head exports too.
"""
import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_seed.config import ConfigError, MoEConfig, load_config
from megatron_seed.convert.hf import FAMILIES, VALUE_HEAD_FILE, family, hf_config, load_hf_checkpoint, save_hf_checkpoint
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from tests.model_utils import tiny_model

transformers = pytest.importorskip("transformers")

QWEN = tiny_model(moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16), num_layers=3, num_dense_layers=1, dense_ffn_size=24)
GLM = tiny_model(moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16, num_shared_experts=1, shared_ffn_size=16, score_function="sigmoid",
                               num_groups=2, top_groups=1), num_layers=3, num_dense_layers=1, dense_ffn_size=24, qk_norm=False)


def _hf_random(m, tmp_path) -> tuple:
    """A randomly initialised transformers model of our emitted config, saved with save_pretrained."""
    torch.manual_seed(0)
    hf = getattr(transformers, FAMILIES[family(m)][0])(hf_config(m)).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros by default: make the bias steer the choice
                buf.copy_(torch.rand_like(buf) * 0.1)
    hf.save_pretrained(str(tmp_path / "hf"))
    return hf, str(tmp_path / "hf")


@pytest.mark.parametrize("m", [QWEN, GLM], ids=["qwen3_moe", "glm4_moe"])
def test_random_transformers_model_round_trips(tmp_path, m) -> None:
    hf, hf_dir = _hf_random(m, tmp_path)
    cfg, sd = load_hf_checkpoint(hf_dir)
    assert dataclasses.replace(cfg, init_std=m.init_std, max_seq_len=m.max_seq_len) == m
    ours = GPTModel(cfg, ParallelState.single())
    ours.load_state_dict(sd)
    ids = torch.randint(0, m.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert (got - expected).abs().max() <= 1e-4

    save_hf_checkpoint(ours.state_dict(), cfg, str(tmp_path / "back"))
    again = getattr(transformers, FAMILIES[family(m)][0]).from_pretrained(str(tmp_path / "back"), dtype=torch.float32)
    original = hf.state_dict()
    assert again.state_dict().keys() == original.keys()
    for name, tensor in again.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("preset", ["tiny", "small", "seed-200b-a20b"])
def test_every_preset_has_a_transformers_family(preset) -> None:
    m = load_config(preset).model
    config = hf_config(m)
    assert config.model_type == family(m) == ("glm4_moe" if m.moe.num_shared_experts else "qwen3_moe")
    assert config.num_hidden_layers == m.num_layers and config.moe_intermediate_size == m.moe.ffn_size


@pytest.mark.timeout(240)
def test_tiny_preset_and_its_critic_give_the_same_outputs_in_transformers(tmp_path) -> None:
    m = load_config("tiny").model
    ids = torch.randint(0, m.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    ours = GPTModel(m, ParallelState.single())
    ours.init_weights(seed=4)
    with torch.no_grad():
        ours.layers["1"].mlp.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, m.moe.num_experts))
    save_hf_checkpoint(ours.state_dict(), m, str(tmp_path / "lm"))
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(str(tmp_path / "lm"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4

    critic_cfg = dataclasses.replace(m, value_head=True)
    critic = GPTModel(critic_cfg, ParallelState.single())
    critic.init_weights(seed=5)
    with torch.no_grad():
        critic.value_head.bias.fill_(0.25)
    save_hf_checkpoint(critic.state_dict(), critic_cfg, str(tmp_path / "critic"))
    base = transformers.Glm4MoeModel.from_pretrained(str(tmp_path / "critic"), dtype=torch.float32).eval()
    head = load_file(os.path.join(tmp_path / "critic", VALUE_HEAD_FILE))
    with torch.no_grad():
        values = base(ids).last_hidden_state @ head["score.weight"].T + head["score.bias"]
        assert (values.squeeze(-1) - critic(ids)).abs().max() <= 1e-4
    cfg_back, sd_back = load_hf_checkpoint(str(tmp_path / "critic"))
    assert cfg_back.value_head
    for name, tensor in critic.state_dict().items():
        torch.testing.assert_close(sd_back[name], tensor, rtol=0, atol=0, msg=name)


def test_what_a_family_cannot_express_is_refused_with_the_reason(tmp_path) -> None:
    softmax_shared = dataclasses.replace(GLM, moe=dataclasses.replace(GLM.moe, score_function="softmax"))
    with pytest.raises(ConfigError, match="GLM-4.5-MoE .* routes with sigmoid"):
        save_hf_checkpoint(GPTModel(softmax_shared, ParallelState.single()).state_dict(), softmax_shared, str(tmp_path / "a"))
    groups = dataclasses.replace(GLM, moe=dataclasses.replace(GLM.moe, num_experts=8, top_k=4, num_groups=2, top_groups=1))
    with pytest.raises(ConfigError, match="best 2"):
        hf_config(groups)
    sigmoid_alone = dataclasses.replace(QWEN, moe=dataclasses.replace(QWEN.moe, score_function="sigmoid"))
    with pytest.raises(ConfigError, match="Qwen3-MoE routes with softmax"):
        hf_config(sigmoid_alone)
    assert not os.path.exists(tmp_path / "a" / "model.safetensors")
