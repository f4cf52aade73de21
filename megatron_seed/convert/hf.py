"""Our GPT-MoE <-> Hugging Face Qwen3-MoE (``Qwen3MoeForCausalLM``).

Works on full (unsharded) state dicts. The HF side uses the checkpoint layout of the
Hub (one tensor per expert projection: ``mlp.experts.{e}.gate_proj.weight`` ...), which
``from_pretrained`` reads and vLLM/SGLang load; the fused in-memory layout of
transformers 5 (``mlp.experts.gate_up_proj [E, 2F, H]``) is accepted on import too.

=============================================  ==============================================
ours                                           Hugging Face (under ``model.`` unless noted)
=============================================  ==============================================
embed_tokens.weight                            embed_tokens.weight
layers.{i}.input_layernorm.weight              layers.{i}.input_layernorm.weight
layers.{i}.self_attn.{q,k,v,o}_proj.weight     layers.{i}.self_attn.{q,k,v,o}_proj.weight
layers.{i}.self_attn.{q,k}_norm.weight         layers.{i}.self_attn.{q,k}_norm.weight
layers.{i}.post_attention_layernorm.weight     layers.{i}.post_attention_layernorm.weight
layers.{i}.mlp.router.weight [E, H]            layers.{i}.mlp.gate.weight
layers.{i}.mlp.experts.w_gate_up [E, 2, F, H]  layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight
layers.{i}.mlp.experts.w_down [E, H, F]        layers.{i}.mlp.experts.{e}.down_proj.weight
layers.{i}.mlp.{gate,up,down}_proj.weight      same (dense layers: HF ``mlp_only_layers``)
norm.weight                                    norm.weight
lm_head.weight                                 lm_head.weight (top level)
=============================================  ==============================================

Qwen3-MoE has neither shared experts nor sigmoid routing; models using them are
refused with the reason rather than exported wrong.
"""
from __future__ import annotations

import json
import os
import re

import torch

from megatron_seed.config import ConfigError, MoEConfig, ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def check_exportable(m: ModelConfig) -> None:
    if m.moe.num_shared_experts:
        raise ConfigError("model.moe.num_shared_experts > 0: Qwen3-MoE has no shared experts; export needs num_shared_experts=0")
    if m.moe.score_function != "softmax":
        raise ConfigError("model.moe.score_function=sigmoid: Qwen3-MoE routes with softmax; export needs score_function=softmax")
    if m.moe.num_groups != 1:
        raise ConfigError("model.moe.num_groups > 1: Qwen3-MoE has no group-limited routing")
    if not m.qk_norm:
        raise ConfigError("model.qk_norm=false: Qwen3-MoE always applies QK-norm")
    if m.value_head:
        raise ConfigError("model.value_head=true: a critic/reward model has no Qwen3-MoE causal-LM equivalent")


def hf_config(m: ModelConfig):
    """The ``Qwen3MoeConfig`` with the same architecture."""
    from transformers import Qwen3MoeConfig

    check_exportable(m)
    return Qwen3MoeConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.dense_ffn_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_embeddings,
        moe_intermediate_size=m.moe.ffn_size,
        num_experts=m.moe.num_experts,
        num_experts_per_tok=m.moe.top_k,
        norm_topk_prob=m.moe.norm_topk_prob,
        router_aux_loss_coef=m.moe.aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(m.num_dense_layers)),
    )


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a Qwen3-MoE ``config.json`` dict."""
    rope = hf.get("rope_parameters") or {}
    dense = hf.get("mlp_only_layers") or []
    if dense != list(range(len(dense))) or hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(f"HF config: mlp_only_layers={dense} / decoder_sparse_step={hf.get('decoder_sparse_step')}: only leading dense layers are supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        qk_norm=True,
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0)),
        max_seq_len=hf.get("max_position_embeddings", 32768),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        num_dense_layers=len(dense),
        dense_ffn_size=hf.get("intermediate_size", 0),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        moe=MoEConfig(
            num_experts=hf.get("num_experts", hf.get("num_local_experts")),  # transformers 5 writes num_local_experts
            top_k=hf["num_experts_per_tok"],
            ffn_size=hf["moe_intermediate_size"],
            norm_topk_prob=hf.get("norm_topk_prob", False),
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        ),
    )


def to_hf_state_dict(sd: dict, m: ModelConfig) -> dict:
    """Our full state dict -> Hub-layout Qwen3-MoE tensors."""
    check_exportable(m)
    out = {}
    for name, t in sd.items():
        if name.endswith(("expert_bias", "expert_load")):
            continue
        if name == "lm_head.weight":
            out[name] = t
            continue
        match = _LAYER.match(name)
        if match is None:
            out[f"model.{name}"] = t
            continue
        i, rest = match.groups()
        prefix = f"model.layers.{i}"
        if rest == "mlp.router.weight":
            out[f"{prefix}.mlp.gate.weight"] = t
        elif rest == "mlp.experts.w_gate_up":
            for e in range(t.shape[0]):
                out[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = t[e, 0]
                out[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = t[e, 1]
        elif rest == "mlp.experts.w_down":
            for e in range(t.shape[0]):
                out[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[f"{prefix}.{rest}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf_sd: dict, m: ModelConfig) -> dict:
    """Hub-layout (or transformers-5 fused) Qwen3-MoE tensors -> our full state dict."""
    out = {}
    experts: dict = {}
    for name, t in hf_sd.items():
        if name == "lm_head.weight":
            if not m.tie_embeddings:
                out[name] = t
            continue
        if not name.startswith("model."):
            raise ValueError(f"unexpected tensor {name!r} in a Qwen3-MoE checkpoint")
        name = name[len("model."):]
        match = _LAYER.match(name)
        if match is None:
            out[name] = t
            continue
        i, rest = match.groups()
        per_expert = re.match(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", rest)
        if rest == "mlp.gate.weight":
            out[f"layers.{i}.mlp.router.weight"] = t
        elif per_expert:
            e, kind = int(per_expert.group(1)), per_expert.group(2)
            experts.setdefault(i, {})[(e, kind)] = t
        elif rest == "mlp.experts.gate_up_proj":
            E, two_f, H = t.shape
            out[f"layers.{i}.mlp.experts.w_gate_up"] = t.reshape(E, 2, two_f // 2, H)
        elif rest == "mlp.experts.down_proj":
            out[f"layers.{i}.mlp.experts.w_down"] = t
        else:
            out[f"layers.{i}.{rest}"] = t
    for i, parts in experts.items():
        E = m.moe.num_experts
        missing = [(e, k) for e in range(E) for k in ("gate", "up", "down") if (e, k) not in parts]
        if missing:
            raise ValueError(f"layer {i}: expert tensors missing from the checkpoint, e.g. expert {missing[0][0]} {missing[0][1]}_proj")
        out[f"layers.{i}.mlp.experts.w_gate_up"] = torch.stack([torch.stack([parts[(e, 'gate')], parts[(e, 'up')]]) for e in range(E)])
        out[f"layers.{i}.mlp.experts.w_down"] = torch.stack([parts[(e, "down")] for e in range(E)])
    return out


def save_hf_checkpoint(sd: dict, m: ModelConfig, out_dir: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``Qwen3MoeForCausalLM.from_pretrained``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(m).to_dict()
    config["architectures"] = ["Qwen3MoeForCausalLM"]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in to_hf_state_dict(sd, m).items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def load_hf_checkpoint(in_dir: str) -> tuple:
    """``(ModelConfig, our state dict)`` from a Qwen3-MoE directory (one or many safetensors files)."""
    from safetensors.torch import load_file

    config_path = os.path.join(in_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face model directory needs config.json")
    with open(config_path) as f:
        hf = json.load(f)
    if hf.get("model_type") not in (None, "qwen3_moe"):
        raise ConfigError(f"{config_path}: model_type={hf.get('model_type')!r}; only qwen3_moe is supported")
    m = model_config_from_hf(hf)
    files = sorted(p for p in os.listdir(in_dir) if p.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {in_dir}")
    hf_sd = {}
    for p in files:
        hf_sd.update(load_file(os.path.join(in_dir, p)))
    return m, from_hf_state_dict(hf_sd, m)
