"""AdamW with gradient reduction over data parallel, a global grad norm, and ZeRO-1.

Parameters fall into two reduction groups: dense parameters (replicated over
``dp_cp``) and expert parameters (replicated over ``edp``). For each group the local
gradients are flattened into one buffer and all-reduced (SUM: the loss is already
normalised by the global token count, so summing gives the one-process gradient).
With ``overlap_grad_reduce`` the all-reduce runs in chunks that start during the
step's last backward pass (:mod:`megatron_seed.train.grad_overlap`); the numbers are
the same.

Mixed precision (``train.precision=bf16``): parameters and their gradients are bf16; the
master weights and both moments are fp32 and the update is computed in fp32, then rounded
into the parameters. Gradients are flattened into fp32 before the data-parallel reduction
(``train.grad_reduce_in_fp32``, Megatron's ``grad_reduce_in_fp32``; false reduces them in
the parameters' dtype, half the traffic, and converts after).

ZeRO-1 (Megatron's distributed optimizer): the flat buffer is cut into ``size``
equal contiguous ranges; a rank keeps the fp32 master copy and both Adam moments only
for its range, updates it, and the updated ranges are all-gathered back into the
parameters. Optimizer memory per rank falls by the group size. With ``zero1=False``
(or a group of one) every rank owns the whole range: the same code, no sharding.

AdamW (decoupled weight decay, as ``torch.optim.AdamW``), per element::

    p <- p * (1 - lr * wd)            (wd = 0 for 1-D parameters: norms, biases)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Grad norm: every parameter counted exactly once across tp/pp/ep/dp: each rank adds
||g||^2 / (number of ranks holding the same values) and the sums are all-reduced
over the world.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_seed.config import TrainConfig
from megatron_seed.parallel.mappings import reduce_scalars
from megatron_seed.parallel.sharding import get_sharding, replicas
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.grad_overlap import GradReduceOverlap


class NonFiniteGradError(FloatingPointError):
    pass


@dataclass
class _Bucket:
    """The parameters of one reduction group and this rank's range of their flat view."""

    params: list
    group_name: str
    start: int  # this rank's range [start, end) of the flat buffer
    end: int
    numel: int  # total elements (unpadded)
    master: torch.Tensor  # fp32 master weights of the range
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    decay_mask: torch.Tensor  # 1.0 where weight decay applies


class DistributedOptimizer:
    """See the module docstring. ``overlap_grad_reduce``: after :meth:`expect_backward_passes`,
    gradient chunks of ``bucket_numel`` elements start their all-reduce during the last
    backward pass (:mod:`megatron_seed.train.grad_overlap`)."""

    def __init__(
        self,
        params: list,
        cfg: TrainConfig,
        ps: ParallelState,
        zero1: bool = True,
        overlap_grad_reduce: bool = False,
        bucket_numel: int = 2**22,
    ):
        self.cfg, self.ps, self.zero1 = cfg, ps, zero1
        self.step_count = 0
        params = [p for p in params if p.requires_grad]
        self.reduce_dtype = torch.float32 if cfg.grad_reduce_in_fp32 or not params else params[0].dtype
        dense = [p for p in params if not get_sharding(p).is_expert]
        expert = [p for p in params if get_sharding(p).is_expert]
        self.buckets = [self._bucket(dense, "dp_cp"), self._bucket(expert, "edp")]
        self.params = params
        self.overlaps = [
            GradReduceOverlap(b.params, ps.group(b.group_name), bucket_numel, self.reduce_dtype)
            if overlap_grad_reduce and ps.size(b.group_name) > 1 and b.params else None
            for b in self.buckets
        ]

    def _bucket(self, params: list, group_name: str) -> _Bucket:
        numel = sum(p.numel() for p in params)
        size = self.ps.size(group_name) if self.zero1 else 1
        shard = math.ceil(numel / size) if numel else 0
        start = min(numel, shard * (self.ps.rank_in(group_name) if self.zero1 else 0))
        end = min(numel, start + shard)
        master = self._range(params, start, end, lambda p, lo, hi: p.detach().reshape(-1)[lo:hi])
        decay = self._range(params, start, end, lambda p, lo, hi: 0.0 if p.dim() < 2 else 1.0)
        return _Bucket(params, group_name, start, end, numel, master, torch.zeros_like(master), torch.zeros_like(master), decay)

    def _range(self, params: list, start: int, end: int, values) -> torch.Tensor:
        """Elements ``[start, end)`` of the parameters' flat fp32 concatenation, filled per parameter
        with ``values(p, lo, hi)`` (its elements ``[lo, hi)``), never building the whole."""
        out = torch.empty(end - start, dtype=torch.float32, device=self.ps.device)
        offset = 0
        for p in params:
            lo, hi = max(start, offset), min(end, offset + p.numel())
            if lo < hi:
                out[lo - start:hi - start] = values(p, lo - offset, hi - offset)
            offset += p.numel()
        return out

    def _flat(self, tensors: list, numel: int) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(numel, device=self.ps.device)

    # ------------------------------------------------------------------ gradients
    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for overlap in self.overlaps:
            if overlap is not None:
                overlap.reset()

    def expect_backward_passes(self, passes: int) -> None:
        """Announce this step's backward passes (one per micro-batch) so the data-parallel
        all-reduce of each gradient chunk can start as soon as its last pass is done."""
        for overlap in self.overlaps:
            if overlap is not None:
                overlap.arm(passes)

    def _reduce_partial_tp_grads(self, flats: list) -> None:
        """Sum over tp the gradients of tp-replicated weights that each tp rank saw only part of.

        Parameters marked ``partial_tp_grad`` in their sharding record (norms under sequence
        parallel, QK-norms, replicated kv projections, the MoE router) hold a partial
        gradient per rank; one flat all-reduce over tp completes them. Applied to the
        dp-reduced flat gradients (sums commute), so the dp all-reduce may start in backward.
        """
        if self.ps.tp_size == 1:
            return
        slices = []
        for b, flat in zip(self.buckets, flats):
            offset = 0
            for p in b.params:
                if get_sharding(p).partial_tp_grad:
                    slices.append(flat[offset:offset + p.numel()])
                offset += p.numel()
        if not slices:
            return
        partial = torch.cat(slices)
        dist.all_reduce(partial, group=self.ps.tp_group)
        offset = 0
        for view in slices:
            view.copy_(partial[offset:offset + view.numel()])
            offset += view.numel()

    def _reduced_flat_grad(self, b: _Bucket, overlap: Optional[GradReduceOverlap]) -> torch.Tensor:
        if overlap is not None and overlap.expected:
            return overlap.finish()
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).to(self.reduce_dtype) for p in b.params]
        flat = self._flat(grads, b.numel)
        group = self.ps.group(b.group_name)
        if self.ps.size(b.group_name) > 1 and flat.numel():
            dist.all_reduce(flat, group=group)
        return flat

    def _grad_norm(self, flats: list) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.ps.device)
        for b, flat in zip(self.buckets, flats):
            offset = 0
            for p in b.params:
                g = flat[offset:offset + p.numel()]
                total += g.double().pow(2).sum() / replicas(p, self.ps)
                offset += p.numel()
        return math.sqrt(reduce_scalars([total], self.ps.group("world"), device=self.ps.device)[0])

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, lr: float) -> float:
        """Reduce gradients, clip by the global norm, update. Returns the norm before clipping.

        Raises :class:`NonFiniteGradError` (parameters untouched) on a NaN/Inf norm.
        """
        flats = [self._reduced_flat_grad(b, overlap).float() for b, overlap in zip(self.buckets, self.overlaps)]
        self._reduce_partial_tp_grads(flats)
        norm = self._grad_norm(flats)
        if not math.isfinite(norm):
            raise NonFiniteGradError(f"gradient norm is {norm}")
        clip = self.cfg.grad_clip
        scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        self.step_count += 1
        b1, b2, eps, wd = self.cfg.adam_beta1, self.cfg.adam_beta2, self.cfg.adam_eps, self.cfg.weight_decay
        bc1, bc2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        for b, flat in zip(self.buckets, flats):
            g = flat[b.start:b.end] * scale
            b.master.mul_(1 - lr * wd * b.decay_mask)
            b.exp_avg.mul_(b1).add_(g, alpha=1 - b1)
            b.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (b.exp_avg_sq / bc2).sqrt_().add_(eps)
            b.master.addcdiv_(b.exp_avg, denom, value=-lr / bc1)
            self._publish(b)
        return norm

    def _publish(self, b: _Bucket) -> None:
        """Write the updated master range back; all-gather the ranges under ZeRO-1."""
        size = self.ps.size(b.group_name) if self.zero1 else 1
        if size > 1:
            shard = math.ceil(b.numel / size)
            padded = b.master.new_zeros(shard)
            padded[: b.end - b.start] = b.master
            parts = [b.master.new_empty(shard) for _ in range(size)]
            dist.all_gather(parts, padded, group=self.ps.group(b.group_name))
            flat = torch.cat(parts)[: b.numel]
        else:
            flat = b.master
        offset = 0
        for p in b.params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def sync_master_from_params(self) -> None:
        """Take the master weights from the parameters (after loading weights only)."""
        for b in self.buckets:
            b.master.copy_(self._range(b.params, b.start, b.end, lambda p, lo, hi: p.detach().reshape(-1)[lo:hi]))

    def state_tensors(self) -> list:
        """Every tensor the optimizer keeps between steps: master weights, both moments, decay masks."""
        return [t for b in self.buckets for t in (b.master, b.exp_avg, b.exp_avg_sq, b.decay_mask)]

    def reducing_gradients(self) -> list:
        """The flat gradient chunks whose overlapped all-reduce started during backward and that
        :meth:`step` has not consumed yet (``overlap_grad_reduce``; empty otherwise)."""
        return [flat for overlap in self.overlaps if overlap is not None for flat, _ in overlap.pending]

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank (master weights and both moments)."""
        return sum(t.numel() * t.element_size() for b in self.buckets for t in (b.master, b.exp_avg, b.exp_avg_sq))

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "buckets": [{"master": b.master, "exp_avg": b.exp_avg, "exp_avg_sq": b.exp_avg_sq, "range": (b.start, b.end)} for b in self.buckets],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        for b, s in zip(self.buckets, state["buckets"]):
            if tuple(s["range"]) != (b.start, b.end):
                raise ValueError(f"optimizer shard range {tuple(s['range'])} != {(b.start, b.end)}: the layout changed")
            b.master.copy_(s["master"])
            b.exp_avg.copy_(s["exp_avg"])
            b.exp_avg_sq.copy_(s["exp_avg_sq"])


def model_parameters(chunks: list) -> list:
    return [p for m in chunks for p in m.parameters()]


def build_optimizer(chunks: list, cfg: TrainConfig, ps: ParallelState, zero1: bool, overlap_grad_reduce: bool = False) -> DistributedOptimizer:
    return DistributedOptimizer(model_parameters(chunks), cfg, ps, zero1, overlap_grad_reduce)

