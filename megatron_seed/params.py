"""Exact parameter counts computed from a :class:`ModelConfig` (no model is built).

Total = every parameter. Activated (per token) = every parameter a token touches:
all non-expert parameters plus ``top_k`` routed experts and the shared experts in
each MoE layer. The test suite checks these formulas against ``sum(p.numel())`` of
instantiated models, so the numbers printed for presets are computed, not typed in.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_seed.config import ModelConfig


@dataclass
class ParamCount:
    embeddings: int  # input embedding + untied output head (none on value-head models)
    attention: int  # q/k/v/o projections and QK-norm weights
    dense_mlp: int  # SwiGLU of the leading dense layers
    router: int
    experts: int  # all routed experts
    shared_experts: int
    norms: int  # per-layer and final RMSNorm weights
    value_head: int
    activated_experts: int  # routed experts touched by one token (top_k of each layer)

    @property
    def total(self) -> int:
        return (
            self.embeddings + self.attention + self.dense_mlp + self.router
            + self.experts + self.shared_experts + self.norms + self.value_head
        )

    @property
    def activated(self) -> int:
        return self.total - self.experts + self.activated_experts

    def breakdown(self) -> dict:
        return {
            "embeddings": self.embeddings,
            "attention": self.attention,
            "dense_mlp": self.dense_mlp,
            "router": self.router,
            "experts": self.experts,
            "shared_experts": self.shared_experts,
            "norms": self.norms,
            "value_head": self.value_head,
        }


@dataclass
class AttentionCount:
    """One attention layer's parameters, by how tensor parallelism lays them out."""

    query_output: int  # q and o projections (split over tp)
    key_value: int  # k and v projections (split over tp, or replicated when tp > kv heads)
    qk_norm: int  # QK-norm weights (replicated over tp)

    @property
    def total(self) -> int:
        return self.query_output + self.key_value + self.qk_norm


def attention_parameters(m: ModelConfig) -> AttentionCount:
    h, d = m.hidden_size, m.head_dim
    return AttentionCount(
        query_output=h * m.num_attention_heads * d * 2,
        key_value=h * m.num_kv_heads * d * 2,
        qk_norm=2 * d if m.qk_norm else 0,
    )


def count_parameters(m: ModelConfig) -> ParamCount:
    h = m.hidden_size
    moe_layers = m.num_layers - m.num_dense_layers
    expert = 3 * h * m.moe.ffn_size
    return ParamCount(
        embeddings=m.vocab_size * h * (1 if m.tie_embeddings or m.value_head else 2),  # a value head replaces the LM head
        attention=m.num_layers * attention_parameters(m).total,
        dense_mlp=m.num_dense_layers * 3 * h * m.dense_ffn_size,
        router=moe_layers * h * m.moe.num_experts,
        experts=moe_layers * m.moe.num_experts * expert,
        shared_experts=moe_layers * m.moe.num_shared_experts * 3 * h * m.moe.shared_ffn_size,
        norms=(2 * m.num_layers + 1) * h,
        value_head=h + 1 if m.value_head else 0,
        activated_experts=moe_layers * m.moe.top_k * expert,
    )


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
