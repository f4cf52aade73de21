"""Differentiable collectives: each forward collective has its adjoint as backward.

=====================================  ===================  ====================
function                               forward              backward
=====================================  ===================  ====================
copy_to_parallel_region                identity             all-reduce
reduce_from_parallel_region            all-reduce           identity
scatter_to_parallel_region             split (keep mine)    all-gather
gather_from_parallel_region            all-gather           split
gather_from_sequence_parallel_region   all-gather           reduce-scatter
reduce_scatter_to_sequence_parallel    reduce-scatter       all-gather
all_to_all                             all-to-all           all-to-all (reverse)
=====================================  ===================  ====================

A ``None`` group (one process) makes every function the identity. gloo has no
reduce-scatter, so there it is an all-reduce followed by taking this rank's chunk:
same numbers, more traffic, CPU only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_seed.parallel.state import Group


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split evenly over {size} ranks")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if dist.get_backend(group) == "gloo":
        return _split(_all_reduce(x, group), group, dim)
    parts = [p.contiguous() for p in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        if group_size(group) == 1:
            return x
        x = x.contiguous()
        rows = sum(output_splits) if output_splits is not None else x.shape[0]
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def copy_to_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group) if group_size(group) > 1 else x


def reduce_from_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group) if group_size(group) > 1 else x


def scatter_to_parallel_region(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    return _ScatterToRegion.apply(x, group, dim) if group_size(group) > 1 else x


def gather_from_parallel_region(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    return _GatherFromRegion.apply(x, group, dim) if group_size(group) > 1 else x


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    return _GatherFromSequenceParallel.apply(x, group, dim) if group_size(group) > 1 else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    return _ReduceScatterToSequenceParallel.apply(x, group, dim) if group_size(group) > 1 else x


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Keep this rank's sequence chunk; backward all-gathers (the adjoint of a split)."""
    return _ScatterToRegion.apply(x, group, dim) if group_size(group) > 1 else x


def all_to_all(x: torch.Tensor, group: Group, output_splits: Optional[list] = None, input_splits: Optional[list] = None) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with optional uneven splits."""
    return _AllToAll.apply(x, group, output_splits, input_splits) if group_size(group) > 1 else x


def all_reduce_no_grad(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (counts, norms, statistics)."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def reduce_scalars(
    values: Sequence[Union[float, torch.Tensor]], group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM, *, device: torch.device
) -> list:
    """``values`` (numbers or one-element tensors) reduced over ``group`` with ``op``, as floats.

    One float64 packet is built on ``device`` (the rank's ``ParallelState.device``: NCCL only
    reduces CUDA tensors) and reduced in one collective, so a handful of statistics costs
    one round trip. With a ``None`` group (one process) the values come back unchanged.
    """
    parts = []
    for i, v in enumerate(values):
        if torch.is_tensor(v):
            if v.numel() != 1:
                raise ValueError(f"reduce_scalars: value {i} has shape {tuple(v.shape)}; each value must be one number")
            parts.append(v.detach().reshape(1).to(device=device, dtype=torch.float64))
        else:
            parts.append(torch.tensor([float(v)], dtype=torch.float64, device=device))
    if not parts:
        return []
    packet = torch.cat(parts)
    if group_size(group) > 1:
        dist.all_reduce(packet, op=op, group=group)
    return packet.tolist()
