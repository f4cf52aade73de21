"""Grouped-query self-attention with RoPE, optional QK-norm, masks and a KV cache.

Shapes: ``B`` batch, ``S`` query length, ``L`` key length (cache slots), ``N`` local
query heads, ``K`` local kv heads, ``D`` head dim, ``H`` hidden.

Tensor parallel: query heads split over tp. kv heads split too when tp divides
them; when tp exceeds them, each rank keeps the full (replicated) k/v weights and
computes only the kv head its query heads use (rank r uses kv head r * K_total // tp);
the replicated weights are marked ``partial_tp_grad`` so their gradients are summed over tp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_seed.config import ModelConfig
from megatron_seed.model.layers import RMSNorm, apply_rotary
from megatron_seed.parallel.sharding import set_sharding
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


@dataclass
class KVCache:
    """Pre-allocated keys/values for every layer of a stage, in slots ``[0, capacity)``.

    All sequences of the batch write slot ``length`` at the same step (left-padded
    prompts); ``valid_BL`` marks slots that hold a real token, so padding is never
    attended to. ``k``/``v``: dict layer id -> ``[B, K, L, D]``.
    """

    k: dict
    v: dict
    valid_BL: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, layer_ids: list, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        shape = (batch, kv_heads, capacity, head_dim)
        k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        return cls(k, v, torch.zeros(batch, capacity, dtype=torch.bool, device=device))

    @property
    def capacity(self) -> int:
        return self.valid_BL.shape[1]

    def select(self, keep_B: torch.Tensor) -> None:
        """Keep only the batch rows in ``keep_B`` (indices), e.g. drop finished sequences."""
        self.k = {i: t[keep_B] for i, t in self.k.items()}
        self.v = {i: t[keep_B] for i, t in self.v.items()}
        self.valid_BL = self.valid_BL[keep_B]


def build_attention_mask(
    S: int,
    device: torch.device,
    padding_mask_BS: Optional[torch.Tensor] = None,
    doc_ids_BS: Optional[torch.Tensor] = None,
    cache: Optional[KVCache] = None,
) -> Optional[torch.Tensor]:
    """Boolean ``[B, 1, S, L]`` mask (True = may attend), or None for plain causal.

    Query i (slot ``start + i``) may attend key slot j when j <= start + i, the key is a
    real token, and (packing) both belong to the same document. A query always sees
    itself, so padding rows stay finite.
    """
    start = cache.length if cache is not None else 0
    if cache is None and padding_mask_BS is None and doc_ids_BS is None:
        return None
    L = start + S
    q_slot = torch.arange(start, L, device=device)
    k_slot = torch.arange(L, device=device)
    allowed = (k_slot[None, :] <= q_slot[:, None]).unsqueeze(0)  # [1, S, L]
    if cache is not None:
        valid_BL = cache.valid_BL[:, :L].clone()
        valid_BL[:, start:L] = True if padding_mask_BS is None else padding_mask_BS
        allowed = allowed & valid_BL[:, None, :]
    elif padding_mask_BS is not None:
        allowed = allowed & padding_mask_BS[:, None, :]
    if doc_ids_BS is not None:
        allowed = allowed & (doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :])
    allowed = allowed | (k_slot[None, :] == q_slot[:, None]).unsqueeze(0)
    return allowed.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_id: int):
        super().__init__()
        tp = ps.tp_size
        self.ps, self.layer_id = ps, layer_id
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp
        self.kv_sharded = cfg.num_kv_heads % tp == 0
        self.num_kv_heads = cfg.num_kv_heads // tp if self.kv_sharded else 1
        self.kv_index = ps.tp_rank * cfg.num_kv_heads // tp  # used when kv weights are replicated
        H, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = ColumnParallelLinear(H, cfg.num_attention_heads * D, ps)
        if self.kv_sharded:
            self.k_proj = ColumnParallelLinear(H, cfg.num_kv_heads * D, ps)
            self.v_proj = ColumnParallelLinear(H, cfg.num_kv_heads * D, ps)
        else:
            self.k_proj = _ReplicatedLinear(H, cfg.num_kv_heads * D, partial_tp_grad=tp > 1)
            self.v_proj = _ReplicatedLinear(H, cfg.num_kv_heads * D, partial_tp_grad=tp > 1)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * D, H, ps)
        self.q_norm = RMSNorm(D, cfg.norm_eps, partial_tp_grad=tp > 1) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps, partial_tp_grad=tp > 1) if cfg.qk_norm else None

    def _kv(self, proj: nn.Module, x_full: torch.Tensor) -> torch.Tensor:
        if self.kv_sharded:
            return proj(x_full, prepared=True)
        rows = slice(self.kv_index * self.head_dim, (self.kv_index + 1) * self.head_dim)
        return F.linear(x_full, proj.weight[rows])

    def forward(
        self,
        x_BSH: torch.Tensor,
        cos_sin: tuple,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        x_full = self.q_proj.prepare_input(x_BSH)
        B, S, _ = x_full.shape
        q_BNSD = self.q_proj(x_full, prepared=True).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BKSD = self._kv(self.k_proj, x_full).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BKSD = self._kv(self.v_proj, x_full).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BNSD, k_BKSD = self.q_norm(q_BNSD), self.k_norm(k_BKSD)
        cos, sin = cos_sin
        q_BNSD, k_BKSD = apply_rotary(q_BNSD, cos, sin), apply_rotary(k_BKSD, cos, sin)
        if cache is not None:
            end = cache.length + S
            cache.k[self.layer_id][:, :, cache.length:end] = k_BKSD
            cache.v[self.layer_id][:, :, cache.length:end] = v_BKSD
            k_BKSD, v_BKSD = cache.k[self.layer_id][:, :, :end], cache.v[self.layer_id][:, :, :end]
        out_BNSD = F.scaled_dot_product_attention(
            q_BNSD, k_BKSD, v_BKSD,
            attn_mask=mask,
            is_causal=mask is None and cache is None,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        out_BSX = out_BNSD.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)
        return self.o_proj(out_BSX)


class _ReplicatedLinear(nn.Module):
    """A full weight kept on every tp rank (kv projections when tp > kv heads)."""

    def __init__(self, in_features: int, out_features: int, partial_tp_grad: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        set_sharding(self.weight, (out_features, in_features), partial_tp_grad=partial_tp_grad)
