"""Our GPT-MoE <-> Hugging Face: Qwen3-MoE without shared experts, GLM-4.5-MoE with them.

The family follows the model: ``num_shared_experts == 0`` exports as ``Qwen3MoeForCausalLM``
(softmax routing, QK-norm); shared experts export as ``Glm4MoeForCausalLM`` (sigmoid routing
with ``e_score_correction_bias``, group-limited top-k, optional QK-norm, leading dense
layers), which transformers, vLLM and SGLang all load. A critic / reward model (value head)
exports its backbone as the family's base model (``Qwen3MoeModel`` / ``Glm4MoeModel``, no LM
head) plus ``value_head.safetensors`` with ``score.weight [1, H]`` and ``score.bias [1]``:
``value = last_hidden_state @ score.weight.T + score.bias``.

HF tensors use the Hub layout (one tensor per expert projection), which ``from_pretrained``
reads; the fused in-memory layout of transformers 5 (``mlp.experts.gate_up_proj [E, 2F, H]``)
is accepted on import too.

=============================================  ==============================================
ours                                           Hugging Face (under ``model.`` unless noted)
=============================================  ==============================================
embed_tokens.weight                            embed_tokens.weight
layers.{i}.input_layernorm.weight              layers.{i}.input_layernorm.weight
layers.{i}.self_attn.{q,k,v,o}_proj.weight     layers.{i}.self_attn.{q,k,v,o}_proj.weight
layers.{i}.self_attn.{q,k}_norm.weight         layers.{i}.self_attn.{q,k}_norm.weight
layers.{i}.post_attention_layernorm.weight     layers.{i}.post_attention_layernorm.weight
layers.{i}.mlp.router.weight [E, H]            layers.{i}.mlp.gate.weight
layers.{i}.mlp.router.expert_bias [E]          layers.{i}.mlp.gate.e_score_correction_bias (GLM)
layers.{i}.mlp.experts.w_gate_up [E, 2, F, H]  layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight
layers.{i}.mlp.experts.w_down [E, H, F]        layers.{i}.mlp.experts.{e}.down_proj.weight
layers.{i}.mlp.shared_experts.*_proj.weight    layers.{i}.mlp.shared_experts.*_proj.weight (GLM)
layers.{i}.mlp.{gate,up,down}_proj.weight      same (leading dense layers)
norm.weight                                    norm.weight
lm_head.weight                                 lm_head.weight (top level)
value_head.{weight,bias}                       score.{weight,bias} in value_head.safetensors
=============================================  ==============================================

Conversions stream: :func:`hf_tensors` yields one HF tensor at a time from a
:class:`TensorSource` (a state dict, or a checkpoint read slice by slice), and
:func:`write_safetensors_shards` writes files of bounded size, so a conversion never holds
more than one file's worth of tensors.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterator, Optional

import torch

from megatron_seed.config import ConfigError, MoEConfig, ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_PER_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
VALUE_HEAD_FILE = "value_head.safetensors"
DEFAULT_SHARD_BYTES = 2 * 2**30
FAMILIES = {"qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeModel"), "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeModel")}


def family(m: ModelConfig) -> str:
    """``glm4_moe`` for models with shared experts, else ``qwen3_moe``."""
    return "glm4_moe" if m.moe.num_shared_experts else "qwen3_moe"


def check_exportable(m: ModelConfig) -> None:
    """Refuse, with the reason, what the model's HF family cannot express."""
    moe = m.moe
    if family(m) == "qwen3_moe":
        if moe.score_function != "softmax":
            raise ConfigError("model.moe.score_function=sigmoid without shared experts: Qwen3-MoE routes with softmax; "
                              "fix: score_function=softmax, or add a shared expert (exports as GLM-4.5-MoE)")
        if moe.num_groups != 1:
            raise ConfigError("model.moe.num_groups > 1 without shared experts: Qwen3-MoE has no group-limited routing")
        if moe.bias_update_rate > 0:
            raise ConfigError("model.moe.bias_update_rate > 0 without shared experts: Qwen3-MoE routing has no expert bias")
        if not m.qk_norm:
            raise ConfigError("model.qk_norm=false: Qwen3-MoE always applies QK-norm")
        return
    if moe.score_function != "sigmoid":
        raise ConfigError("model.moe.score_function=softmax with shared experts: GLM-4.5-MoE (the HF family with shared experts) "
                          "routes with sigmoid; fix: model.moe.score_function=sigmoid")
    if moe.shared_ffn_size != moe.ffn_size:
        raise ConfigError(f"model.moe.shared_ffn_size={moe.shared_ffn_size} != ffn_size={moe.ffn_size}: GLM-4.5-MoE sizes its shared "
                          "experts as n_shared_experts x moe_intermediate_size; fix: make them equal")
    if moe.num_groups > 1 and moe.top_k // moe.top_groups != 2:
        raise ConfigError(f"model.moe.top_k={moe.top_k} / top_groups={moe.top_groups}: GLM-4.5-MoE scores a group by its best 2 "
                          "experts, ours by its best top_k // top_groups; fix: top_k = 2 x top_groups")


def hf_config(m: ModelConfig):
    """The transformers config (``Qwen3MoeConfig`` or ``Glm4MoeConfig``) of the same architecture."""
    check_exportable(m)
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.dense_ffn_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_kv_heads,
                  head_dim=m.head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                  tie_word_embeddings=m.tie_embeddings, moe_intermediate_size=m.moe.ffn_size, num_experts_per_tok=m.moe.top_k,
                  norm_topk_prob=m.moe.norm_topk_prob)
    if family(m) == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                              num_experts=m.moe.num_experts, router_aux_loss_coef=m.moe.aux_loss_coef, decoder_sparse_step=1,
                              mlp_only_layers=list(range(m.num_dense_layers)))
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**common, partial_rotary_factor=1.0,
                         rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta, "partial_rotary_factor": 1.0},
                         n_routed_experts=m.moe.num_experts, n_shared_experts=m.moe.num_shared_experts, routed_scaling_factor=1.0,
                         n_group=m.moe.num_groups, topk_group=m.moe.top_groups, first_k_dense_replace=m.num_dense_layers,
                         use_qk_norm=m.qk_norm, attention_bias=False, num_mtp_layers=0)


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a Qwen3-MoE or GLM-4.5-MoE ``config.json`` dict."""
    kind = hf.get("model_type", "qwen3_moe")
    rope = hf.get("rope_parameters") or {}
    if kind == "glm4_moe":
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        if partial != 1.0:
            raise ConfigError(f"HF config: partial_rotary_factor={partial}: our attention rotates the whole head; only 1.0 is supported")
        if hf.get("attention_bias") or hf.get("routed_scaling_factor", 1.0) != 1.0:
            raise ConfigError(f"HF config: attention_bias={hf.get('attention_bias')} / routed_scaling_factor={hf.get('routed_scaling_factor')}: "
                              "supported are false / 1.0")
        num_dense = hf.get("first_k_dense_replace", 0)
        moe = MoEConfig(num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"], ffn_size=hf["moe_intermediate_size"],
                        num_shared_experts=hf.get("n_shared_experts", 0), shared_ffn_size=hf["moe_intermediate_size"],
                        score_function="sigmoid", norm_topk_prob=hf.get("norm_topk_prob", True),
                        num_groups=hf.get("n_group", 1), top_groups=hf.get("topk_group", 1))
        qk_norm = hf.get("use_qk_norm", False)
    elif kind == "qwen3_moe":
        dense = hf.get("mlp_only_layers") or []
        if dense != list(range(len(dense))) or hf.get("decoder_sparse_step", 1) != 1:
            raise ConfigError(f"HF config: mlp_only_layers={dense} / decoder_sparse_step={hf.get('decoder_sparse_step')}: only leading dense layers are supported")
        num_dense = len(dense)
        moe = MoEConfig(num_experts=hf.get("num_experts", hf.get("num_local_experts")),  # transformers 5 writes num_local_experts
                        top_k=hf["num_experts_per_tok"], ffn_size=hf["moe_intermediate_size"],
                        norm_topk_prob=hf.get("norm_topk_prob", False), aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
        qk_norm = True
    else:
        raise ConfigError(f"HF config: model_type={kind!r}; supported are qwen3_moe and glm4_moe")
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"], qk_norm=qk_norm,
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0)), max_seq_len=hf.get("max_position_embeddings", 32768),
        norm_eps=hf.get("rms_norm_eps", 1e-6), num_dense_layers=num_dense, dense_ffn_size=hf.get("intermediate_size", 0),
        tie_embeddings=hf.get("tie_word_embeddings", False), value_head="value_head" in hf.get("megatron_seed", {}), moe=moe,
    )


# ----------------------------------------------------------------------------- tensor sources


class TensorSource:
    """Global tensors by our names: ``names()``, ``shape(name)``, ``get(name)`` and ``get_rows(name, start, n)``
    (rows ``[start, start + n)`` of dim 0, e.g. one expert's weights, without reading the rest)."""

    def __init__(self, get: Callable, shape: Callable, names: list, get_rows: Optional[Callable] = None):
        self._get, self._shape, self._names = get, shape, names
        self._get_rows = get_rows or (lambda name, start, n: get(name)[start:start + n])

    @classmethod
    def from_state_dict(cls, sd: dict) -> "TensorSource":
        return cls(sd.__getitem__, lambda name: tuple(sd[name].shape), list(sd))

    @classmethod
    def from_checkpoint(cls, ckpt) -> "TensorSource":
        """Our checkpoint (:class:`megatron_seed.train.checkpoint.Checkpoint`), read one slice at a time."""
        names = [k[len("model/"):] for k in ckpt.keys("model/")]

        def rows(name: str, start: int, n: int) -> torch.Tensor:
            shape = ckpt.shape(f"model/{name}")
            return ckpt.read_box(f"model/{name}", (start,) + (0,) * (len(shape) - 1), (n, *shape[1:]))

        return cls(lambda name: ckpt.read_full(f"model/{name}"), lambda name: ckpt.shape(f"model/{name}"), names, rows)

    def names(self) -> list:
        return self._names

    def shape(self, name: str) -> tuple:
        return self._shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)

    def get_rows(self, name: str, start: int, n: int) -> torch.Tensor:
        return self._get_rows(name, start, n)


def hf_tensors(source: TensorSource, m: ModelConfig) -> Iterator[tuple]:
    """``(hf_name, tensor)`` one at a time, Hub layout; the value head's tensors come as ``score.*``."""
    check_exportable(m)
    glm = family(m) == "glm4_moe"
    names = set(source.names())
    for name in source.names():
        if name.endswith("expert_load"):
            continue
        if name in ("value_head.weight", "value_head.bias"):
            yield "score." + name.split(".")[-1], source.get(name)
            continue
        if name == "lm_head.weight":
            yield name, source.get(name)
            continue
        match = _LAYER.match(name)
        if match is None:
            yield f"model.{name}", source.get(name)
            continue
        i, rest = match.groups()
        prefix = f"model.layers.{i}"
        if rest == "mlp.router.weight":
            yield f"{prefix}.mlp.gate.weight", source.get(name)
            if glm and f"layers.{i}.mlp.router.expert_bias" not in names:
                yield f"{prefix}.mlp.gate.e_score_correction_bias", torch.zeros(m.moe.num_experts)
        elif rest == "mlp.router.expert_bias":
            yield f"{prefix}.mlp.gate.e_score_correction_bias", source.get(name)
        elif rest == "mlp.experts.w_gate_up":
            for e in range(source.shape(name)[0]):
                w = source.get_rows(name, e, 1)[0]
                yield f"{prefix}.mlp.experts.{e}.gate_proj.weight", w[0]
                yield f"{prefix}.mlp.experts.{e}.up_proj.weight", w[1]
        elif rest == "mlp.experts.w_down":
            for e in range(source.shape(name)[0]):
                yield f"{prefix}.mlp.experts.{e}.down_proj.weight", source.get_rows(name, e, 1)[0]
        else:
            yield f"{prefix}.{rest}", source.get(name)


def to_hf_state_dict(sd: dict, m: ModelConfig) -> dict:
    """Our full state dict -> Hub-layout HF tensors (value head as ``score.*``)."""
    return {k: v.contiguous() for k, v in hf_tensors(TensorSource.from_state_dict(sd), m)}


def from_hf_tensors(items: Iterator[tuple], m: ModelConfig) -> Iterator[tuple]:
    """Hub-layout (or transformers-5 fused) HF ``(name, tensor)`` -> ours, one tensor at a time.

    Per-expert tensors of a layer are collected until the layer's ``E`` experts are complete
    and stacked then (HF files keep a layer's experts together, so one layer is held at most).
    """
    E = m.moe.num_experts
    experts: dict = {}
    for name, t in items:
        if name in ("score.weight", "score.bias"):
            yield "value_head." + name.split(".")[1], t
            continue
        if name == "lm_head.weight":
            if not m.tie_embeddings and not m.value_head:
                yield name, t
            continue
        if not name.startswith("model."):
            raise ValueError(f"unexpected tensor {name!r} in a {family(m)} checkpoint")
        name = name[len("model."):]
        match = _LAYER.match(name)
        if match is None:
            yield name, t
            continue
        i, rest = match.groups()
        per_expert = _PER_EXPERT.match(rest)
        if rest == "mlp.gate.weight":
            yield f"layers.{i}.mlp.router.weight", t
        elif rest == "mlp.gate.e_score_correction_bias":
            yield f"layers.{i}.mlp.router.expert_bias", t
        elif per_expert:
            parts = experts.setdefault(i, {})
            parts[(int(per_expert.group(1)), per_expert.group(2))] = t
            if len(parts) == 3 * E:
                yield from _stacked_experts(i, experts.pop(i), E)
        elif rest == "mlp.experts.gate_up_proj":
            E_, two_f, H = t.shape
            yield f"layers.{i}.mlp.experts.w_gate_up", t.reshape(E_, 2, two_f // 2, H)
        elif rest == "mlp.experts.down_proj":
            yield f"layers.{i}.mlp.experts.w_down", t
        else:
            yield f"layers.{i}.{rest}", t
    for i, parts in experts.items():
        missing = [(e, k) for e in range(E) for k in ("gate", "up", "down") if (e, k) not in parts]
        raise ValueError(f"layer {i}: expert tensors missing from the checkpoint, e.g. expert {missing[0][0]} {missing[0][1]}_proj")


def _stacked_experts(i: str, parts: dict, E: int) -> Iterator[tuple]:
    yield f"layers.{i}.mlp.experts.w_gate_up", torch.stack([torch.stack([parts[(e, "gate")], parts[(e, "up")]]) for e in range(E)])
    yield f"layers.{i}.mlp.experts.w_down", torch.stack([parts[(e, "down")] for e in range(E)])


def from_hf_state_dict(hf_sd: dict, m: ModelConfig) -> dict:
    """Hub-layout (or transformers-5 fused) HF tensors -> our full state dict."""
    return dict(from_hf_tensors(iter(hf_sd.items()), m))


# ----------------------------------------------------------------------------- files


def write_safetensors_shards(items: Iterator[tuple], out_dir: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                             dtype: Optional[torch.dtype] = torch.float32) -> list:
    """Write ``(name, tensor)`` into ``model.safetensors`` or, past ``max_shard_bytes``, into
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (the Hub layout).
    ``score.*`` tensors go to ``value_head.safetensors``. At most one file's tensors are held."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    written, weight_map, shard, size, head = [], {}, {}, 0, {}

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"part-{len(written):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            written.append((name, list(shard)))
        shard, size = {}, 0

    total = 0
    for name, t in items:
        t = t.detach().cpu().to(dtype).contiguous() if dtype is not None else t.detach().cpu().contiguous()
        if name.startswith("score."):
            head[name] = t
            continue
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    files = []
    for k, (tmp, names) in enumerate(written):
        final = "model.safetensors" if len(written) == 1 else f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        weight_map.update(dict.fromkeys(names, final))
        files.append(final)
    if len(written) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    if head:
        save_file(head, os.path.join(out_dir, VALUE_HEAD_FILE), metadata={"format": "pt"})
        files.append(VALUE_HEAD_FILE)
    return files


def write_hf_config(m: ModelConfig, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(m).to_dict()
    causal, base = FAMILIES[family(m)]
    config["architectures"] = [base if m.value_head else causal]
    if m.value_head:
        config["megatron_seed"] = {"value_head": VALUE_HEAD_FILE}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def save_hf_checkpoint(sd: dict, m: ModelConfig, out_dir: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write ``config.json`` + safetensors that ``<Family>ForCausalLM.from_pretrained`` loads
    (a value-head model: the base model plus ``value_head.safetensors``)."""
    export(TensorSource.from_state_dict(sd), m, out_dir, max_shard_bytes)


def export(source: TensorSource, m: ModelConfig, out_dir: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list:
    """Stream ``source`` into a Hugging Face directory; returns the files written."""
    check_exportable(m)
    write_hf_config(m, out_dir)
    return write_safetensors_shards(hf_tensors(source, m), out_dir, max_shard_bytes)


def read_hf_config(in_dir: str) -> ModelConfig:
    config_path = os.path.join(in_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face model directory needs config.json")
    with open(config_path) as f:
        hf = json.load(f)
    try:
        return model_config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from e


def hf_file_tensors(in_dir: str) -> Iterator[tuple]:
    """Every tensor of a Hugging Face directory, one at a time (memory-mapped safetensors)."""
    from safetensors import safe_open

    files = sorted(p for p in os.listdir(in_dir) if p.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {in_dir}")
    for p in files:
        path = os.path.join(in_dir, p)
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # a garbled header or short data surfaces in several ways
            raise ValueError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from e


def load_hf_checkpoint(in_dir: str) -> tuple:
    """``(ModelConfig, our state dict)`` from a Qwen3-MoE or GLM-4.5-MoE directory (one or many files)."""
    m = read_hf_config(in_dir)
    return m, dict(from_hf_tensors(hf_file_tensors(in_dir), m))
