"""Tensor-parallel layers and vocab-parallel losses (Megatron's tensor_parallel, in brief).

* :class:`ColumnParallelLinear`: ``W [O, I]`` split along O; output stays split.
* :class:`RowParallelLinear`: ``W [O, I]`` split along I; partial outputs all-reduced
  (or reduce-scattered along the sequence under sequence parallel).
* :class:`VocabParallelEmbedding`: rows of the table split over tp.
* :func:`vocab_parallel_log_probs` / :func:`vocab_parallel_entropy`: log p(token) and
  entropy from vocab-sharded logits without gathering the vocabulary.

Under sequence parallel, a column-parallel layer all-gathers its ``[B, S/tp, H]``
input along S and a row-parallel layer reduce-scatters its output back along S.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_seed.gemm import linear
from megatron_seed.parallel.mappings import (
    copy_to_parallel_region,
    gather_from_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_seed.parallel.sharding import ShardDim, set_sharding
from megatron_seed.parallel.state import ParallelState


def column_parallel_input(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """The input every tp rank multiplies by its column shard: all-gathered along S under
    sequence parallel, else the same tensor with its gradient all-reduced over tp."""
    if ps.sequence_parallel:
        return gather_from_sequence_parallel_region(x, ps.tp_group, 1)
    return copy_to_parallel_region(x, ps.tp_group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along the output dim; ``gather_output`` all-gathers y."""

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, gather_output: bool = False, std: Optional[float] = None):
        super().__init__()
        tp = ps.tp_size
        if out_features % tp:
            raise ValueError(f"ColumnParallelLinear: out_features={out_features} not divisible by tp={tp}")
        self.ps, self.gather_output = ps, gather_output
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features))
        set_sharding(self.weight, (out_features, in_features), (ShardDim(0, "tp", tp),), std=std)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """See :func:`column_parallel_input`; callers sharing an input prepare it once and
        call ``forward(x, prepared=True)`` on each layer (q/k/v, gate/up)."""
        return column_parallel_input(x, self.ps)

    def forward(self, x: torch.Tensor, prepared: bool = False) -> torch.Tensor:
        y = linear(x if prepared else self.prepare_input(x), self.weight)
        return gather_from_parallel_region(y, self.ps.tp_group, -1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T with W split along the input dim; x arrives already split."""

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, std: Optional[float] = None):
        super().__init__()
        tp = ps.tp_size
        if in_features % tp:
            raise ValueError(f"RowParallelLinear: in_features={in_features} not divisible by tp={tp}")
        self.ps = ps
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp))
        set_sharding(self.weight, (out_features, in_features), (ShardDim(1, "tp", tp),), std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        if self.ps.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, self.ps.tp_group, 1)
        return reduce_from_parallel_region(y, self.ps.tp_group)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows over tp: each rank looks up ids in its range."""

    def __init__(self, vocab_size: int, hidden_size: int, ps: ParallelState):
        super().__init__()
        tp = ps.tp_size
        self.ps = ps
        self.local_vocab = vocab_size // tp
        self.vocab_start = ps.tp_rank * self.local_vocab
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden_size))
        set_sharding(self.weight, (vocab_size, hidden_size), (ShardDim(0, "tp", tp),))

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(ids_BS, self.weight)
        local = ids_BS - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        x_BSH = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.ps.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(x_BSH, self.ps.tp_group, 1)
        return reduce_from_parallel_region(x_BSH, self.ps.tp_group)


def _shifted_logits(logits_BSV: torch.Tensor, ps: ParallelState) -> tuple:
    """Subtract the global max over the vocabulary (no gradient through the max)."""
    local_max = logits_BSV.detach().float().amax(dim=-1, keepdim=True)
    if ps.tp_size > 1:
        torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=ps.tp_group)
    z = logits_BSV.float() - local_max
    sum_exp = reduce_from_parallel_region(z.exp().sum(dim=-1), ps.tp_group)
    return z, sum_exp


def vocab_parallel_log_probs(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """log softmax(logits)[target] per position, from vocab-sharded logits.

    log p = z_t - log sum_v exp(z_v) with z = logits - max; the target's logit lives on
    exactly one tp rank and is summed in. Cross-entropy is ``-vocab_parallel_log_probs``.
    """
    z, sum_exp = _shifted_logits(logits_BSV, ps)
    local_vocab = z.shape[-1]
    local = targets_BS - ps.tp_rank * local_vocab
    inside = (local >= 0) & (local < local_vocab)
    target_z = z.gather(-1, local.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1) * inside
    target_z = reduce_from_parallel_region(target_z, ps.tp_group)
    return target_z - sum_exp.log()


def vocab_parallel_entropy(logits_BSV: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Entropy of softmax(logits) per position: H = log S - sum_v exp(z_v) z_v / S."""
    z, sum_exp = _shifted_logits(logits_BSV, ps)
    weighted = reduce_from_parallel_region((z.exp() * z).sum(dim=-1), ps.tp_group)
    return sum_exp.log() - weighted / sum_exp


def vocab_parallel_argmax(logits_BSV: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Global argmax over a vocab-sharded last dim (ties: lowest id), gathering only (max, id) pairs."""
    local_max, local_idx = logits_BSV.max(dim=-1)
    if ps.tp_size == 1:
        return local_idx
    global_idx = local_idx + ps.tp_rank * logits_BSV.shape[-1]
    maxes = gather_from_parallel_region(local_max.unsqueeze(-1).contiguous(), ps.tp_group, -1)
    idxs = gather_from_parallel_region(global_idx.unsqueeze(-1).contiguous(), ps.tp_group, -1)
    best = maxes.argmax(dim=-1, keepdim=True)  # first maximum = lowest rank = lowest id
    return idxs.gather(-1, best).squeeze(-1)
