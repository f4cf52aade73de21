"""Grouped-query self-attention with RoPE, optional QK-norm, masks and a KV cache.

Shapes: ``B`` batch, ``S`` query length, ``L`` key length (cache slots), ``N`` local
query heads, ``K`` local kv heads, ``D`` head dim, ``H`` hidden.

Tensor parallel: query heads split over tp. kv heads split too when tp divides
them; when tp exceeds them, each rank keeps the full (replicated) k/v weights and
computes only the kv head its query heads use (rank r uses kv head r * K_total // tp);
the replicated weights are marked ``partial_tp_grad`` so their gradients are summed over tp.

Context parallel: the mask is a :class:`~megatron_seed.parallel.context_parallel.ContextParallelMask`
and the local queries attend over K/V all-gathered along the sequence (see that module).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_seed.config import ModelConfig
from megatron_seed.gemm import linear, matmul
from megatron_seed.model.layers import RMSNorm, apply_rotary, rms_norm
from megatron_seed.parallel import context_parallel
from megatron_seed.parallel.sharding import set_sharding
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


@dataclass
class KVCache:
    """Pre-allocated keys/values for every layer of a stage, in slots ``[0, capacity)``.

    All sequences of the batch write slot ``length`` at the same step (left-padded
    prompts). ``k``: dict layer id -> ``[B, K, D, L]``, keys stored transposed, so the
    decode step's ``q @ k`` reads them in the layout CPU GEMMs take fastest (the whole
    decode attention: 81 vs 95 us at B=16, L=100); ``v``: dict layer id -> ``[B, K, L, D]``.
    Prefills (SDPA) use the new keys directly. ``bias_BL`` is the additive
    attention bias of each slot: 0 where it holds a real token, ``-inf`` for padding and
    slots not yet written, so padding is never attended to.

    The cursor is kept twice: ``length`` (a Python int, for slicing) and ``slot_1`` (the
    same number in a ``[1]`` int64 tensor). Decode steps (one token per row) write their
    slot through ``slot_1`` and attend over the first ``length + 1`` slots, so under
    ``torch.compile`` the only number of the cache a step reads is ``length`` as a size,
    which torch's automatic dynamic shapes make symbolic after the first change: one graph
    serves every step. (Attending over all ``capacity`` slots would need no symbolic size,
    but costs attention over the unwritten ones: at 512 new tokens that made the compiled
    step slower than the eager one.)
    """

    k: dict
    v: dict
    bias_BL: torch.Tensor
    slot_1: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, layer_ids: list, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        k = {i: torch.zeros(batch, kv_heads, head_dim, capacity, dtype=dtype, device=device) for i in layer_ids}
        v = {i: torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device) for i in layer_ids}
        bias_BL = torch.full((batch, capacity), float("-inf"), dtype=dtype, device=device)
        return cls(k, v, bias_BL, torch.zeros(1, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.bias_BL.shape[1]

    def open_slots(self, S: int, padding_mask_BS: Optional[torch.Tensor]) -> None:
        """Mark the next ``S`` slots as real tokens (or padding where ``padding_mask_BS`` is
        False) before the layers write them; :meth:`advance` moves the cursor after."""
        if S == 1 and padding_mask_BS is None:  # a decode step: through slot_1 (see the class docstring)
            self.bias_BL.index_fill_(1, self.slot_1, 0.0)
            return
        slots = self.bias_BL[:, self.length:self.length + S]
        if padding_mask_BS is None:
            slots.zero_()
        else:
            slots.copy_(torch.where(padding_mask_BS, 0.0, float("-inf")))

    def advance(self, S: int) -> None:
        """Move the cursor past the ``S`` slots the layers just wrote."""
        self.length += S
        self.slot_1 += S

    def select(self, keep_B: torch.Tensor) -> None:
        """Keep only the batch rows in ``keep_B`` (indices), e.g. drop finished sequences."""
        self.k = {i: t[keep_B] for i, t in self.k.items()}
        self.v = {i: t[keep_B] for i, t in self.v.items()}
        self.bias_BL = self.bias_BL[keep_B]


def build_attention_mask(
    S: int,
    device: torch.device,
    padding_mask_BS: Optional[torch.Tensor] = None,
    doc_ids_BS: Optional[torch.Tensor] = None,
    cache: Optional[KVCache] = None,
) -> Optional[torch.Tensor]:
    """The ``mask`` argument of :class:`Attention` for one forward of ``S`` queries.

    * A decode step (``S == 1`` on a cache, no padding mask): the cache's additive bias
      ``[B, 1, 1, L]``, a view, so nothing is built per step; the slot being written must
      be opened (:meth:`KVCache.open_slots`) before the layers run, so the query sees itself.
    * Otherwise a boolean ``[B, 1, S, L]`` (True = may attend), or None for plain causal.
      Query i (slot ``start + i``) may attend key slot j when j <= start + i, the key is a
      real token, and (packing, no cache) both belong to the same document. A query always
      sees itself, so padding rows stay finite.
    """
    if cache is not None and doc_ids_BS is not None:
        raise ValueError("build_attention_mask: doc_ids_BS (packed documents) cannot be combined with a KV cache")
    if cache is not None and S == 1 and padding_mask_BS is None:
        return cache.bias_BL[:, None, None, :cache.length + 1]
    start = cache.length if cache is not None else 0
    L = start + S
    if cache is None and padding_mask_BS is None and doc_ids_BS is None:
        return None
    q_slot = torch.arange(start, L, device=device)
    k_slot = torch.arange(L, device=device)
    allowed = (k_slot[None, :] <= q_slot[:, None]).unsqueeze(0)  # [1, S, L]
    if cache is not None:
        valid_BL = cache.bias_BL[:, :L] == 0
        valid_BL[:, start:L] = True if padding_mask_BS is None else padding_mask_BS
        allowed = allowed & valid_BL[:, None, :]
    elif padding_mask_BS is not None:
        allowed = allowed & padding_mask_BS[:, None, :]
    if doc_ids_BS is not None:
        allowed = allowed & (doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :])
    allowed = allowed | (k_slot[None, :] == q_slot[:, None]).unsqueeze(0)
    return allowed.unsqueeze(1)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(D) + mask) v over GQA heads (query head n reads kv head n // (N / K)),
    with q, k QK-normed (optional) and rotated by RoPE, then the output projection.

    Two ways to compute the same thing:

    * one-token steps on a cache (decode): ``q [B, K, G, D] @ k [B, K, D, L]`` + bias,
      softmax, ``@ v``: four small ops, on CPU 81 vs 126 us for SDPA's flash kernel at
      B=16, L=100 (13 vs 16 us at B=1); equal to SDPA to fp32 rounding;
    * everything else: ``F.scaled_dot_product_attention``.

    Inside :meth:`fused_projections` (inference only), q, k and v come from one GEMM on a
    concatenated copy of the three weights, and q and k are QK-normed and rotated together.
    """

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
        self.qkv_weight: Optional[torch.Tensor] = None  # [(N + 2K) D, H], set by fused_projections
        self.qk_norm_weight: Optional[torch.Tensor] = None  # [N + K, D], set by fused_projections

    def _kv_weight(self, proj: nn.Module) -> torch.Tensor:
        """This rank's k or v weight: its shard, or the rows of its kv head when replicated."""
        if self.kv_sharded:
            return proj.weight
        return proj.weight[self.kv_index * self.head_dim:(self.kv_index + 1) * self.head_dim]

    @contextlib.contextmanager
    def fused_projections(self) -> Iterator[None]:
        """Inference only: q/k/v weights (this rank's shards) concatenated into one ``[(N + 2K) D, H]``
        GEMM, and the two QK-norm weights into one ``[N + K, D]`` table.

        The copies are made on entry and dropped on exit, since training changes the weights
        between generations; forwards that record gradients ignore them (no gradient would
        reach the parameters through a copy).
        """
        with torch.no_grad():
            self.qkv_weight = torch.cat([self.q_proj.weight, self._kv_weight(self.k_proj), self._kv_weight(self.v_proj)])
            if self.q_norm is not None:
                self.qk_norm_weight = torch.cat([
                    self.q_norm.weight.expand(self.num_heads, self.head_dim),
                    self.k_norm.weight.expand(self.num_kv_heads, self.head_dim),
                ])
        try:
            yield
        finally:
            self.qkv_weight = self.qk_norm_weight = None

    def _qkv(self, x_full: torch.Tensor, cos_sin: tuple) -> tuple:
        """q ``[B, S, N, D]``, k and v ``[B, S, K, D]``, q and k normed and rotated."""
        B, S, _ = x_full.shape
        N, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = cos_sin
        if self.qkv_weight is not None and not torch.is_grad_enabled():
            qk_BSXD, v_BSKD = linear(x_full, self.qkv_weight).view(B, S, N + 2 * K, D).split([N + K, K], dim=2)
            if self.qk_norm_weight is not None:
                qk_BSXD = rms_norm(qk_BSXD, self.qk_norm_weight, self.q_norm.eps)
            q_BSND, k_BSKD = apply_rotary(qk_BSXD, cos, sin).split([N, K], dim=2)
            return q_BSND, k_BSKD, v_BSKD
        q_BSND = self.q_proj(x_full, prepared=True).view(B, S, N, D)
        k_BSKD = linear(x_full, self._kv_weight(self.k_proj)).view(B, S, K, D)
        v_BSKD = linear(x_full, self._kv_weight(self.v_proj)).view(B, S, K, D)
        if self.q_norm is not None:
            q_BSND, k_BSKD = self.q_norm(q_BSND), self.k_norm(k_BSKD)
        return apply_rotary(q_BSND, cos, sin), apply_rotary(k_BSKD, cos, sin), v_BSKD

    def forward(
        self,
        x_BSH: torch.Tensor,
        cos_sin: tuple,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """``cos_sin`` from :func:`rotary_cos_sin`; ``mask`` from :func:`build_attention_mask`
        (with a cache, the slots of this forward already open)."""
        x_full = self.q_proj.prepare_input(x_BSH)
        B, S, _ = x_full.shape
        q_BSND, k_BSKD, v_BSKD = self._qkv(x_full, cos_sin)
        if cache is not None and S == 1 and mask is not None and mask.is_floating_point():  # the cache's additive bias
            out_BSX = self._decode_attention(q_BSND, k_BSKD, v_BSKD, mask, cache)
        else:
            out_BSX = self._attention(q_BSND, k_BSKD, v_BSKD, mask, cache)
        return self.o_proj(out_BSX)

    def _decode_attention(self, q_B1ND, k_B1KD, v_B1KD, bias_B11L: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One query per row against the cache: scores ``[B, K, G, L]`` with G = N / K query heads per kv head."""
        B, N, K, D = q_B1ND.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        end = bias_B11L.shape[-1]  # length + 1
        k_BKDL, v_BKLD = cache.k[self.layer_id], cache.v[self.layer_id]
        k_BKDL.index_copy_(3, cache.slot_1, k_B1KD.permute(0, 2, 3, 1))  # [B, K, D, 1] into slot `slot_1`
        v_BKLD.index_copy_(2, cache.slot_1, v_B1KD.transpose(1, 2))
        scores_BKGL = matmul(q_B1ND.view(B, K, N // K, D), k_BKDL[:, :, :, :end])
        # bias + scores / sqrt(D); the softmax in fp32 under bf16 (a no-op cast in fp32)
        probs_BKGL = torch.add(bias_B11L, scores_BKGL, alpha=D ** -0.5).softmax(dim=-1, dtype=torch.float32).to(v_B1KD.dtype)
        return matmul(probs_BKGL, v_BKLD[:, :, :end]).view(B, 1, N * D)

    def _attention(self, q_BSND, k_BSKD, v_BSKD, mask: Optional[torch.Tensor], cache: Optional[KVCache]) -> torch.Tensor:
        B, S = q_BSND.shape[:2]
        q_BNSD, k_BKSD, v_BKSD = q_BSND.transpose(1, 2), k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2)
        if isinstance(mask, context_parallel.ContextParallelMask):  # this rank's share of the sequence
            k_BKSD, v_BKSD = context_parallel.gather_kv(k_BKSD, v_BKSD, mask)  # the whole sequence's, in order
            if cache is not None:  # a prefill (cache empty): every cp rank keeps all of it for the decode
                cache.k[self.layer_id][:, :, :, :k_BKSD.shape[2]] = k_BKSD.transpose(-1, -2)
                cache.v[self.layer_id][:, :, :v_BKSD.shape[2]] = v_BKSD
            out_BNSD = context_parallel.attention(q_BNSD, k_BKSD, v_BKSD, mask, enable_gqa=self.num_heads != self.num_kv_heads)
            return out_BNSD.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)
        if cache is not None:
            start, end = cache.length, cache.length + S
            cache.k[self.layer_id][:, :, :, start:end] = k_BKSD.transpose(-1, -2)
            cache.v[self.layer_id][:, :, start:end] = v_BKSD
            if start > 0:  # else the new keys are all the keys; SDPA is slow on the cache's transposed ones
                k_BKSD, v_BKSD = cache.k[self.layer_id][:, :, :, :end].transpose(-1, -2), cache.v[self.layer_id][:, :, :end]
        out_BNSD = F.scaled_dot_product_attention(
            q_BNSD, k_BKSD, v_BKSD,
            attn_mask=mask,
            is_causal=mask is None and cache is None,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out_BNSD.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)


class _ReplicatedLinear(nn.Module):
    """A full weight kept on every tp rank (kv projections when tp > kv heads)."""

    def __init__(self, in_features: int, out_features: int, partial_tp_grad: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        set_sharding(self.weight, (out_features, in_features), partial_tp_grad=partial_tp_grad)
