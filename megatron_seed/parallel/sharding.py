"""How each parameter is laid out across ranks, recorded once on the parameter.

A parameter is created at its local shape and tagged with :func:`set_sharding`:
the full (one-process) shape, the dims split over which groups, how it is
initialised, and whether it is an expert weight. That single record drives

* :func:`init_parameters`: every rank draws the full tensor from a generator seeded
  by (seed, parameter name) and keeps its shard, so values equal the one-process
  model under any layout;
* :func:`gather_full` / :func:`shard_full` / :func:`full_state_dict`: checkpoints, conversion,
  weight syncs and parallel-equals-serial tests;
* gradient reduction (dense over dp, experts over edp; tp first for ``partial_tp_grad``)
  and grad-norm counting.

Shard index along a dim: ``rank_in(group) * shards // size(group)``. ``shards`` may be
smaller than the group size (e.g. 2 kv heads over tp=4): ranks then hold replicas.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_seed.parallel.state import ParallelState


@dataclass(frozen=True)
class ShardDim:
    dim: int
    group: str  # a ParallelState group name: "tp", "ep", "etp"
    shards: int  # distinct shards along ``dim``


@dataclass
class Sharding:
    full_shape: tuple
    dims: tuple = ()
    init: str = "normal"  # normal | ones | zeros
    std: Optional[float] = None  # None: the model's init_std
    is_expert: bool = False  # gradients reduced over edp instead of dp
    # Replicated over tp, but each tp rank computes only part of the gradient (its chunk of
    # the sequence under sequence parallel, or its attention heads): summed over tp by the
    # optimizer, once per step, before the data-parallel reduction.
    partial_tp_grad: bool = False


def set_sharding(
    param: nn.Parameter,
    full_shape: tuple,
    dims: tuple = (),
    init: str = "normal",
    std: Optional[float] = None,
    is_expert: bool = False,
    partial_tp_grad: bool = False,
) -> nn.Parameter:
    param.sharding = Sharding(tuple(full_shape), tuple(dims), init, std, is_expert, partial_tp_grad)
    return param


def get_sharding(param: torch.Tensor) -> Sharding:
    sharding = getattr(param, "sharding", None)
    return sharding if sharding is not None else Sharding(tuple(param.shape))


def shard_index(ps: ParallelState, d: ShardDim) -> int:
    return ps.rank_in(d.group) * d.shards // ps.size(d.group)


def shard_full(full: torch.Tensor, param: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """This rank's shard of a full tensor laid out like ``param``."""
    out = full
    for d in get_sharding(param).dims:
        out = out.chunk(d.shards, dim=d.dim)[shard_index(ps, d)]
    return out.contiguous()


def gather_full(param: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """The full tensor of a sharded parameter (collective over its shard groups)."""
    out = param.detach()
    for d in reversed(get_sharding(param).dims):
        group, size = ps.group(d.group), ps.size(d.group)
        if size == 1:
            continue
        parts = [torch.empty_like(out) for _ in range(size)]
        dist.all_gather(parts, out.contiguous(), group=group)
        step = size // d.shards  # keep one replica per distinct shard
        out = torch.cat(parts[::step], dim=d.dim)
    return out


def full_state_dict(modules: list, ps: ParallelState) -> Optional[dict]:
    """The one-process state dict of a model held as ``modules`` (this rank's chunks), on global rank 0.

    Collective over the world: every parameter is gathered to full shape inside its stage
    (:func:`gather_full`, over tp / ep / etp); buffers are replicated and taken as they
    are; then one rank per pipeline stage (dp, tp and cp rank 0) sends its stage's
    entries to rank 0, which returns their union (layers keep their global names). Every
    other rank returns None. The whole model passes through rank 0's memory; unsharded
    entries share storage with the live parameters (use the result before training on).
    """
    local = {}
    for module in modules:
        params = dict(module.named_parameters())
        for name, value in module.state_dict().items():
            local[name] = gather_full(params[name], ps) if name in params else value.detach()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    sender = ps.dp_rank == 0 and ps.tp_rank == 0 and ps.rank_in("cp") == 0
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local if sender else None, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    return {name: value for part in parts if part is not None for name, value in part.items()}


def replicas(param: torch.Tensor, ps: ParallelState) -> int:
    """How many ranks hold an identical copy of this parameter's local values."""
    sharding = get_sharding(param)
    distinct = 1
    for d in sharding.dims:
        distinct *= d.shards
    per_stage = ps.layout.tp * ps.layout.cp * ps.layout.dp
    return per_stage // distinct


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, ps: ParallelState, std: float) -> None:
    """Initialise every parameter as the one-process model would, then keep the shard.

    normal: N(0, std^2) drawn with a generator seeded by (seed, parameter name), so the
    values depend on neither the layout nor the order modules were built in. Every buffer
    (the router's balancing bias and load counts) starts at zero. Tensors on ``meta`` hold
    no values and are left as they are.
    """
    for buffer in module.buffers():
        if not buffer.is_meta:
            buffer.zero_()
    for name, param in module.named_parameters():
        if param.is_meta:
            continue
        sharding = get_sharding(param)
        if sharding.init == "ones":
            param.fill_(1.0)
            continue
        if sharding.init == "zeros":
            param.zero_()
            continue
        gen = torch.Generator().manual_seed(_seed_for(seed, name))
        full = torch.empty(sharding.full_shape, dtype=torch.float32)
        full.normal_(0.0, sharding.std if sharding.std is not None else std, generator=gen)
        param.copy_(shard_full(full, param, ps).to(param.dtype))
