"""Context parallelism: each cp rank holds part of every sequence; attention sees all of it.

Shapes: ``B`` batch, ``S`` full sequence, ``s = S / cp`` local, ``L = S / (2 cp)`` one
chunk, ``N`` query heads, ``K`` kv heads, ``D`` head dim (all local to tp).

Layout (load-balanced "zig-zag", as Megatron-core): the sequence is cut into ``2 cp``
chunks of ``L`` tokens and cp rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r``, side by
side (``[B, s]``). Under causal attention chunk ``c`` attends over ``c + 1`` chunks of
keys, so every rank's pair costs ``2 cp + 1`` chunk-blocks: the causal work is even.
:func:`shard_microbatch` is the one place a training batch is cut (``Trainer.microbatches``
calls it for every micro-batch of a step or a forward-only pass); :func:`gather_sequence` puts per-token outputs back in
order. Rollout prefills are sharded the same way and every cp rank caches the whole
prompt's K/V; decode steps then run replicated over cp (:func:`is_sharded_forward`).

Attention: all-gather K/V over cp, not a ring. Each layer all-gathers its local keys and
values (the backward reduce-scatters their gradients), reorders them to global order and
runs SDPA per local chunk over the prefix of keys it may see. Why not ring attention:

* under GQA, K and V are ``N / K`` times smaller than the queries that stay local, so the
  gathered ``[B, K, S, D]`` is cheap next to the activations cp shards;
* packed documents and padding are one boolean mask over global positions per chunk, and
  a causal-only batch uses SDPA's lower-right causal bias (no ``L x S`` mask); a ring needs
  a per-block mask and merging partial softmaxes by their log-sum-exp, which
  ``F.scaled_dot_product_attention`` does not return, so it would mean hand-written
  attention instead of the fused kernels;
* one collective per layer, the same on gloo and NCCL.

The cost: the gathered K/V of a layer are kept for its backward (``2 S K D`` per layer,
against ``s H`` for the local hidden states), and the all-gather is not overlapped with
compute (Llama 3 made the same choice for document-masked long-context training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_seed.parallel.mappings import gather_from_sequence_parallel_region
from megatron_seed.parallel.state import Group, LayoutError, ParallelState


def is_active(ps: ParallelState) -> bool:
    return ps.layout.cp > 1


def sequence_multiple(ps: ParallelState) -> int:
    """What a sequence length must be a multiple of under this layout: ``tp`` (tensor-parallel MoE
    and sequence parallel split the local sequence over tp), times ``2 cp`` chunks under cp."""
    return ps.tp_size * (2 * ps.layout.cp if is_active(ps) else 1)


def check_sequence_length(S: int, ps: ParallelState, what: str = "sequence length") -> None:
    multiple = sequence_multiple(ps)
    if S % multiple:
        raise LayoutError(f"{what} {S} is not divisible by 2 x parallel.cp={ps.layout.cp} x parallel.tp={ps.tp_size} = "
                          f"{multiple} (context parallel cuts it into 2 cp equal chunks, each split again over tp); "
                          f"fix: make it a multiple of {multiple} or change parallel.cp")


def is_sharded_forward(ps: ParallelState, s: int, cache=None) -> bool:
    """Whether a model forward of ``s`` tokens holds this rank's share of the sequence.

    Under cp, training forwards and rollout prefills (an empty KV cache) are sharded;
    one-token forwards and continuations of a filled cache (decode steps) are replicated
    over cp: every cp rank caches the whole prompt and decodes the same rows.
    """
    return is_active(ps) and s > 1 and (cache is None or cache.length == 0)


def last_position(x_B: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """The output at the sequence's last position, from the local outputs' last one (``x_BS...[:, -1]``):
    the last chunk is cp rank 0's second, so rank 0's value is broadcast over cp."""
    if not is_active(ps):
        return x_B
    x_B = x_B.contiguous()
    dist.broadcast(x_B, src=ps.global_rank("cp", 0), group=ps.group("cp"))
    return x_B


def local_chunk_ids(ps: ParallelState) -> tuple:
    """The two chunk indices (of ``2 cp``) this rank holds, in local order."""
    cp, r = ps.layout.cp, ps.rank_in("cp")
    return r, 2 * cp - 1 - r


def local_positions(s: int, ps: ParallelState, device: torch.device) -> torch.Tensor:
    """``[s]``: the global position of each local token."""
    L = s // 2
    return torch.cat([torch.arange(c * L, (c + 1) * L, device=device) for c in local_chunk_ids(ps)])


def _global_order(S: int, cp: int, device: torch.device) -> torch.Tensor:
    """``[S]``: for each global position, its index in the rank-order concatenation of local shards."""
    L = S // (2 * cp)
    p = torch.arange(S, device=device)
    chunk, offset = p // L, p % L
    owner = torch.where(chunk < cp, chunk, 2 * cp - 1 - chunk)
    return owner * 2 * L + torch.where(chunk < cp, offset, L + offset)


def shard_sequence(x: torch.Tensor, ps: ParallelState, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of ``x`` along ``dim`` (a full sequence), concatenated."""
    S = x.shape[dim]
    check_sequence_length(S, ps)
    L = S // (2 * ps.layout.cp)
    return torch.cat([x.narrow(dim, c * L, L) for c in local_chunk_ids(ps)], dim=dim)


def is_token_key(key: str) -> bool:
    """A batch key holding one entry per token: its shape suffix starts with ``BS`` (``mask_BS``, ``routes_BSLA``)."""
    return key.rpartition("_")[2].startswith("BS")


def shard_microbatch(mb: dict, ps: ParallelState) -> dict:
    """This rank's tokens of a micro-batch: every per-token tensor (:func:`is_token_key`) cut along S (per-row
    ``*_B`` entries and the rest kept). Identity when cp = 1."""
    if not is_active(ps):
        return mb
    return {k: shard_sequence(v, ps, 1) if is_token_key(k) else v for k, v in mb.items()}


@torch.no_grad()
def gather_sequence(x: torch.Tensor, ps: ParallelState, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's local ``x`` (no gradient: outputs of forward-only passes)."""
    if not is_active(ps):
        return x
    cp = ps.layout.cp
    local = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()  # gloo gathers no bools
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local, group=ps.group("cp"))
    full = torch.cat(parts, dim=dim)
    return full.index_select(dim, _global_order(full.shape[dim], cp, x.device)).to(x.dtype)


@dataclass
class ContextParallelMask:
    """How the local queries attend over the gathered sequence; built once per forward.

    ``masks[i]``: for local chunk ``chunk_ids[i]`` = c, a bool ``[B, 1, L, (c + 1) L]`` over the
    first ``c + 1`` chunks of keys (True = may attend), or None for plain causal attention.
    """

    group: Group
    chunk_ids: tuple
    order_S: torch.Tensor
    masks: tuple


def build_mask(s: int, ps: ParallelState, device: torch.device, padding_mask_BS: Optional[torch.Tensor] = None,
               doc_ids_BS: Optional[torch.Tensor] = None) -> ContextParallelMask:
    """The cp counterpart of ``build_attention_mask`` (same rule, global positions): query ``q``
    may attend key ``k <= q`` when the key is a real token and both are in the same document;
    a query always sees itself. ``padding_mask_BS`` / ``doc_ids_BS`` are the local shards."""
    cp = ps.layout.cp
    S, L = s * cp, s // 2
    order_S = _global_order(S, cp, device)
    ids = local_chunk_ids(ps)
    if padding_mask_BS is None and doc_ids_BS is None:
        return ContextParallelMask(ps.group("cp"), ids, order_S, (None, None))
    valid_BS = gather_sequence(padding_mask_BS, ps) if padding_mask_BS is not None else None
    docs_BS = gather_sequence(doc_ids_BS, ps) if doc_ids_BS is not None else None
    masks = []
    for i, c in enumerate(ids):
        q_pos = torch.arange(c * L, (c + 1) * L, device=device)
        k_pos = torch.arange((c + 1) * L, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None]).unsqueeze(0)  # [1, L, (c+1) L]
        if valid_BS is not None:
            allowed = allowed & valid_BS[:, None, :(c + 1) * L]
        if docs_BS is not None:
            local_docs = doc_ids_BS[:, i * L:(i + 1) * L]
            allowed = allowed & (local_docs[:, :, None] == docs_BS[:, None, :(c + 1) * L])
        allowed = allowed | (k_pos[None, :] == q_pos[:, None]).unsqueeze(0)
        masks.append(allowed.unsqueeze(1))
    return ContextParallelMask(ps.group("cp"), ids, order_S, tuple(masks))


def gather_kv(k_BKsD: torch.Tensor, v_BKsD: torch.Tensor, mask: ContextParallelMask) -> tuple:
    """The whole sequence's keys and values ``[B, K, S, D]`` in global order: all-gathered over cp
    (backward: their gradients reduce-scattered back to the ranks that own them)."""
    k_BKSD = gather_from_sequence_parallel_region(k_BKsD, mask.group, 2).index_select(2, mask.order_S)
    v_BKSD = gather_from_sequence_parallel_region(v_BKsD, mask.group, 2).index_select(2, mask.order_S)
    return k_BKSD, v_BKSD


def attention(q_BNsD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask: ContextParallelMask,
              enable_gqa: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v of the local queries over the whole sequence's keys
    (:func:`gather_kv`): ``[B, N, s, D]``. Local chunk ``c`` attends over the first ``c + 1`` chunks."""
    # imported here: torch.nn.attention.bias imports torch._dynamo, about half of what importing the
    # model costs, which every spawned worker and CLI call would pay without ever using context parallelism
    from torch.nn.attention.bias import causal_lower_right

    L = q_BNsD.shape[2] // 2
    outs = []
    for i, c in enumerate(mask.chunk_ids):
        end = (c + 1) * L
        bias = mask.masks[i] if mask.masks[i] is not None else causal_lower_right(L, end)
        outs.append(F.scaled_dot_product_attention(q_BNsD[:, :, i * L:(i + 1) * L], k_BKSD[:, :, :end], v_BKSD[:, :, :end],
                                                   attn_mask=bias, enable_gqa=enable_gqa))
    return torch.cat(outs, dim=2)
