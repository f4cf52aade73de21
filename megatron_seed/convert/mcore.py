"""Our GPT-MoE <-> a megatron-core ``GPTModel`` (MoE) state dict, at tp = pp = ep = 1 (full tensors).

megatron-core's names and fused layouts (local, non-Transformer-Engine layer spec)::

    embedding.word_embeddings.weight                      embed_tokens.weight
    decoder.layers.{i}.input_layernorm.weight             layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.weight   q/k/v_proj fused per query group:
        [(N/K + 2) * K * D, H] = for each kv group g: its N/K query heads, key head g, value head g
    decoder.layers.{i}.self_attention.linear_proj.weight  self_attn.o_proj.weight
    decoder.layers.{i}.self_attention.{q,k}_layernorm     self_attn.{q,k}_norm.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight           post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight [2F, H]      [gate_proj; up_proj] (dense layers)
    decoder.layers.{i}.mlp.linear_fc2.weight              down_proj (dense layers)
    decoder.layers.{i}.mlp.router.weight / .expert_bias   mlp.router.weight / .expert_bias
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight [2F, H] = [w_gate_up[e, 0]; w_gate_up[e, 1]]
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight [H, F]  = w_down[e]
    decoder.layers.{i}.mlp.shared_experts.linear_fc{1,2}.weight   mlp.shared_experts.{[gate; up], down}
    decoder.final_layernorm.weight                        norm.weight
    output_layer.weight                                   lm_head.weight

Experts are per-expert modules (``SequentialMLP``, ``moe_grouped_gemm=False``): megatron-core's
grouped variants need the CUDA ``grouped_gemm`` package or Transformer Engine to be built, so no
CPU test could hold a conversion to their layout. Linear layers also carry an ``_extra_state`` entry (``None`` without Transformer Engine);
:func:`to_mcore_state_dict` adds them so ``load_state_dict(strict=True)`` accepts the dict.
:func:`transformer_config_kwargs` gives the ``TransformerConfig`` of the same model. A value
head has no GPTModel counterpart and is refused.

Files (:func:`export_mcore`): ``model*.safetensors`` with the tensors above plus
``mcore_config.json`` (``transformer_config`` and ``gpt_model`` arguments and our ``model`` config, which :func:`import_mcore` reads back).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator

import torch

from megatron_seed.config import ConfigError, MoEConfig, ModelConfig
from megatron_seed.convert.hf import DEFAULT_SHARD_BYTES, TensorSource, hf_file_tensors, write_safetensors_shards

CONFIG_FILE = "mcore_config.json"
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def check_exportable(m: ModelConfig) -> None:
    if m.value_head:
        raise ConfigError("model.value_head=true: megatron-core's GPTModel has no value head; export the critic to Hugging Face instead")
    if m.tie_embeddings:
        raise ConfigError("model.tie_embeddings=true: export supports untied embeddings (GPTModel share_embeddings_and_output_weights=False)")


def transformer_config_kwargs(m: ModelConfig) -> dict:
    """Keyword arguments of ``megatron.core.transformer.TransformerConfig`` for the same model
    (plus ``activation_func`` = SiLU, which JSON cannot hold: the caller adds it)."""
    moe = m.moe
    kwargs = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads, kv_channels=m.head_dim, ffn_hidden_size=m.dense_ffn_size if m.num_dense_layers else moe.ffn_size,
        normalization="RMSNorm", layernorm_epsilon=m.norm_eps, qk_layernorm=m.qk_norm, gated_linear_unit=True,
        add_bias_linear=False, num_moe_experts=moe.num_experts, moe_ffn_hidden_size=moe.ffn_size, moe_router_topk=moe.top_k,
        moe_layer_freq=[0] * m.num_dense_layers + [1] * (m.num_layers - m.num_dense_layers),
        moe_router_score_function=moe.score_function, moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=moe.score_function == "sigmoid" or moe.bias_update_rate > 0,
        moe_router_topk_scaling_factor=None, moe_router_dtype="fp32",
        moe_shared_expert_intermediate_size=moe.num_shared_experts * moe.shared_ffn_size or None,
    )
    if moe.num_groups > 1:
        kwargs.update(moe_router_num_groups=moe.num_groups, moe_router_group_topk=moe.top_groups)
    if moe.bias_update_rate > 0:
        kwargs["moe_router_bias_update_rate"] = moe.bias_update_rate
    return kwargs


def gpt_model_kwargs(m: ModelConfig) -> dict:
    return dict(vocab_size=m.vocab_size, max_sequence_length=m.max_seq_len, position_embedding_type="rope",
                rotary_base=int(m.rope_theta), share_embeddings_and_output_weights=False)


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    K, D, H = m.num_kv_heads, m.head_dim, m.hidden_size
    per_group = m.num_attention_heads // K
    return torch.cat([q.view(K, per_group * D, H), k.view(K, D, H), v.view(K, D, H)], dim=1).reshape(-1, H)


def _split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple:
    K, D, H = m.num_kv_heads, m.head_dim, m.hidden_size
    per_group = m.num_attention_heads // K
    q, k, v = qkv.view(K, (per_group + 2) * D, H).split([per_group * D, D, D], dim=1)
    return q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)


_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.router.weight": "mlp.router.weight",
    "mlp.router.expert_bias": "mlp.router.expert_bias",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
}
_TOP = {"embed_tokens.weight": "embedding.word_embeddings.weight", "norm.weight": "decoder.final_layernorm.weight",
        "lm_head.weight": "output_layer.weight"}


def mcore_tensors(source: TensorSource, m: ModelConfig) -> Iterator[tuple]:
    """``(megatron-core name, tensor)`` one at a time (one layer's expert stack at most)."""
    check_exportable(m)
    for name in source.names():
        if name in _TOP:
            yield _TOP[name], source.get(name)
            continue
        i, rest = _LAYER.match(name).groups()
        prefix = f"decoder.layers.{i}"
        if rest in _RENAMES:
            yield f"{prefix}.{_RENAMES[rest]}", source.get(name)
        elif rest == "self_attn.q_proj.weight":
            attn = f"layers.{i}.self_attn"
            yield f"{prefix}.self_attention.linear_qkv.weight", _fuse_qkv(source.get(name), source.get(f"{attn}.k_proj.weight"),
                                                                         source.get(f"{attn}.v_proj.weight"), m)
        elif rest in ("mlp.gate_proj.weight", "mlp.shared_experts.gate_proj.weight"):
            block = rest.rsplit(".", 2)[0]  # mlp or mlp.shared_experts
            up = source.get(f"layers.{i}.{block}.up_proj.weight")
            yield f"{prefix}.{block}.linear_fc1.weight", torch.cat([source.get(name), up])
        elif rest == "mlp.experts.w_gate_up":
            E, _, F, H = source.shape(name)
            for e in range(E):
                yield f"{prefix}.mlp.experts.local_experts.{e}.linear_fc1.weight", source.get_rows(name, e, 1)[0].reshape(2 * F, H)
        elif rest == "mlp.experts.w_down":
            for e in range(source.shape(name)[0]):
                yield f"{prefix}.mlp.experts.local_experts.{e}.linear_fc2.weight", source.get_rows(name, e, 1)[0]
        elif rest.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue  # fused above
        else:
            raise ValueError(f"{name}: no megatron-core counterpart")


def to_mcore_state_dict(sd: dict, m: ModelConfig) -> dict:
    """Our full state dict -> a dict ``GPTModel.load_state_dict(strict=True)`` takes (with ``_extra_state``)."""
    out = dict(mcore_tensors(TensorSource.from_state_dict(sd), m))
    for name in list(out):
        if name.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight", "output_layer.weight")):
            out[name.rsplit(".", 1)[0] + "._extra_state"] = None
    return out


def from_mcore_tensors(items: Iterator[tuple], m: ModelConfig) -> Iterator[tuple]:
    """megatron-core ``(name, tensor)`` -> ours; ``_extra_state`` entries are skipped."""
    inverse = {v: k for k, v in _RENAMES.items()}
    top = {v: k for k, v in _TOP.items()}
    E, F = m.moe.num_experts, m.moe.ffn_size
    experts: dict = {}
    for name, t in items:
        if name.endswith("._extra_state"):
            continue
        if name in top:
            yield top[name], t
            continue
        match = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
        if match is None:
            raise ValueError(f"unexpected tensor {name!r} in a megatron-core GPTModel state dict")
        i, rest = match.groups()
        ours = f"layers.{i}"
        per_expert = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$", rest)
        if rest in inverse:
            yield f"{ours}.{inverse[rest]}", t
        elif rest == "self_attention.linear_qkv.weight":
            for proj, w in zip("qkv", _split_qkv(t, m)):
                yield f"{ours}.self_attn.{proj}_proj.weight", w
        elif rest in ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight"):
            block = rest.rsplit(".", 2)[0]
            gate, up = t.chunk(2)
            yield f"{ours}.{block}.gate_proj.weight", gate
            yield f"{ours}.{block}.up_proj.weight", up
        elif per_expert:
            parts = experts.setdefault(i, {})
            parts[(int(per_expert.group(1)), per_expert.group(2))] = t
            if len(parts) == 2 * E:
                parts = experts.pop(i)
                yield f"{ours}.mlp.experts.w_gate_up", torch.stack([parts[(e, "1")].reshape(2, F, -1) for e in range(E)])
                yield f"{ours}.mlp.experts.w_down", torch.stack([parts[(e, "2")] for e in range(E)])
        else:
            raise ValueError(f"{name}: not a tensor of our GPT-MoE")
    if experts:
        i, parts = next(iter(experts.items()))
        missing = sorted({e for e in range(E)} - {e for e, _ in parts})
        raise ValueError(f"layer {i}: megatron-core expert tensors missing, e.g. expert {missing[0] if missing else '?'}")


def from_mcore_state_dict(sd: dict, m: ModelConfig) -> dict:
    """A megatron-core GPTModel state dict -> our full state dict."""
    return dict(from_mcore_tensors(iter(sd.items()), m))


def export_mcore(source: TensorSource, m: ModelConfig, out_dir: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list:
    """Stream ``source`` into megatron-core-named safetensors files plus ``mcore_config.json``."""
    check_exportable(m)
    files = write_safetensors_shards(mcore_tensors(source, m), out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump({"transformer_config": transformer_config_kwargs(m), "gpt_model": gpt_model_kwargs(m),
                   "model": dataclasses.asdict(m)}, f, indent=1)
    return files + [CONFIG_FILE]


def import_mcore(in_dir: str) -> tuple:
    """``(ModelConfig, iterator of our (name, tensor))`` from a directory :func:`export_mcore` wrote."""
    path = os.path.join(in_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: from-mcore reads a directory written by 'convert to-mcore'")
    with open(path) as f:
        model = json.load(f)["model"]
    m = ModelConfig(**{**model, "moe": MoEConfig(**model["moe"])})
    return m, from_mcore_tensors(hf_file_tensors(in_dir), m)
