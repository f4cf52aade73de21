"""megatron-core interop: a real ``GPTModel`` (MoE) built on CPU loads our export with ``strict=True``,
and our import of its state dict reproduces our weights bitwise.

megatron-core's MoE router allocates its expert-bias buffers on ``torch.cuda.current_device()``;
on a CPU build of torch that call raises, so the test points it at the CPU while the model is
built (``use_cpu_initialization`` covers the parameters). Its forward does not run on CPU
(DESIGN.md), so the check is the strict load and the tensors.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron_seed.config import ConfigError, MoEConfig
from megatron_seed.convert.hf import TensorSource
from megatron_seed.convert.mcore import (export_mcore, from_mcore_state_dict, gpt_model_kwargs, import_mcore, to_mcore_state_dict,
                                         transformer_config_kwargs)
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from tests.model_utils import tiny_model

pytest.importorskip("megatron.core")

SHARED = tiny_model(num_layers=3, num_dense_layers=1, dense_ffn_size=24,
                    moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16, num_shared_experts=1, shared_ffn_size=16, score_function="sigmoid"))
PLAIN = tiny_model(moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16))


def _build_mcore(m):
    torch.cuda.current_device = lambda: "cpu"  # see the module docstring; this runs in a spawned worker only
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel as McoreGPT
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    config = TransformerConfig(**transformer_config_kwargs(m), activation_func=torch.nn.functional.silu, use_cpu_initialization=True,
                               moe_grouped_gemm=False, params_dtype=torch.float32)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    return McoreGPT(config=config, transformer_layer_spec=spec, **gpt_model_kwargs(m))


def _interop(rank: int, world: int, m, out_dir: str) -> dict:
    ours = GPTModel(m, ParallelState.single())
    ours.init_weights(seed=11)
    if ours.layers[str(m.num_layers - 1)].mlp.router.has_bias:
        with torch.no_grad():
            ours.layers[str(m.num_layers - 1)].mlp.router.expert_bias.copy_(torch.arange(m.moe.num_experts) * 0.01)
    mcore = _build_mcore(m)
    exported = to_mcore_state_dict(ours.state_dict(), m)
    result = mcore.load_state_dict(exported, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    back = from_mcore_state_dict(mcore.state_dict(), m)
    assert back.keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)
    export_mcore(TensorSource.from_state_dict(ours.state_dict()), m, out_dir, max_shard_bytes=20_000)
    m_back, items = import_mcore(out_dir)
    assert m_back == m
    for name, tensor in items:
        torch.testing.assert_close(tensor, ours.state_dict()[name], rtol=0, atol=0, msg=name)
    return {"names": sorted(exported)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("m", [SHARED, PLAIN], ids=["shared-experts", "plain"])
def test_megatron_core_gpt_model_loads_our_export_strictly(tmp_path, m) -> None:
    (names,) = [r["names"] for r in run_distributed(_interop, 1, m, str(tmp_path / "mcore"))]
    assert any("linear_qkv" in n for n in names) and any("shared_experts.linear_fc1" in n for n in names) == bool(m.moe.num_shared_experts)
    assert any("local_experts.0.linear_fc1" in n for n in names)


def test_value_head_and_unknown_tensors_are_refused(tmp_path) -> None:
    critic = dataclasses.replace(SHARED, value_head=True)
    with pytest.raises(ConfigError, match="GPTModel has no value head"):
        to_mcore_state_dict(GPTModel(critic, ParallelState.single()).state_dict(), critic)
    with pytest.raises(ValueError, match="decoder.layers.0.mlp.bogus.weight: not a tensor"):
        from_mcore_state_dict({"decoder.layers.0.mlp.bogus.weight": torch.zeros(1)}, SHARED)
    with pytest.raises(FileNotFoundError, match="mcore_config.json not found"):
        import_mcore(str(tmp_path))
    assert not os.listdir(tmp_path)
