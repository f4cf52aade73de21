"""Memory-free dry run: one rank of an N-rank job in one CPU process, on tensors that hold no memory.

What runs is the real code of every phase a job runs on that rank (model build, LM train
step, rollout prefill and one decode step, checkpoint state dicts; layers above may add
phases, ``extra_phases`` of :func:`dry_run`), on these stand-ins:

* **tensors on ``meta``** (``ParallelState.device``): shapes, dtypes and strides without
  storage, so the ``seed-200b-a20b`` preset at its real shape fits a laptop. torch's fake
  *cuda* tensors (``FakeTensorMode``) run forward ops on this CPU-only build, but the autograd
  engine aborts on them and random initialisation fails, so every phase runs on meta.
* **a checking process group** (backend ``dryrun``, :class:`DryRunProcessGroup`), built like
  torch's fake one (``FakeStore``, no communication, every collective completes at once) that
  also refuses a collective whose tensors are not all on the run's device (NCCL reduces CUDA
  tensors only) and one whose sizes cannot match the peers' (uneven all-to-all splits,
  gather lists, reduce-scatter shards). Object collectives (pickles in byte tensors, which
  need the peer's real bytes) return this rank's objects, or :class:`UnknownValues` from a
  peer.
* **a dispatch mode** (:class:`DryRunMode`) that sees every aten op: it refuses an op whose
  non-scalar operands sit on different devices, names the module it ran in, counts every byte
  allocated off the run's device, and keeps the rank's memory by category (see below).

Host reads of device values (``.item()``, ``.tolist()``): meta tensors have no values, so the
mode keeps real copies of the small tensors computed from constants only (masks, positions,
token counts, expert counts under balanced routing; at most ``SHADOW_LIMIT`` elements) and
answers reads from them; a value no constant determines (a loss, a norm) reads as 1. A
floating-point tensor built from known values and unknown numbers (a statistic packet ``[sum of
the advantages, token count]``) is shadowed with NaN where unknown: NaN elements read as 1, the
known ones as they are (so whitening divides by the batch's real token count); an integer or
bool result of such an op is unknown as a whole (a comparison with NaN decides nothing). Data-
dependent shapes therefore follow the real code path: the MoE all-to-all splits come from the
counts of the routing the dry run forces to be balanced (``model.moe.router_force_balance``,
Megatron's forced load balancing: slots round robin over the ep ranks and experts), with every
rank assumed to route like this one (a batch whose slots ``T * A`` ep does not divide cannot be
balanced that way and is refused at the all-to-all).

Memory: every storage on the run's device is counted from the op that allocated it until it is
freed. At each new peak the live bytes are split into ``parameters``, ``gradients`` (``p.grad``
and the flat fp32 chunks of an overlapped gradient all-reduce started in backward),
``optimizer_states`` (fp32 master weights, Adam moments, decay mask), ``kv_cache`` and the rest,
which is ``activations`` when allocated inside a module's forward or backward and
``temporaries`` otherwise (e.g. the optimizer's flat gradient buffers). Attention runs the
meta implementations of the CUDA flash / memory-efficient kernels (no S x S matrix is kept
for causal attention), so activations are what the GPU kernels keep (:class:`GpuAttentionMode`).
"""
from __future__ import annotations

import contextlib
import copy
import os
import site
import sys
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._tools.mod_tracker import ModTracker
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from megatron_seed.config import Config, ConfigError

RUN_DEVICE = torch.device("meta")
SHADOW_LIMIT = 1 << 20  # elements: larger tensors are never given real values
CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations", "kv_cache", "temporaries")


class DryRunError(RuntimeError):
    """A device mismatch, shape error or collective size mismatch found by the dry run."""


# ----------------------------------------------------------------------------- the active run


class _Run:
    """State shared by the dispatch mode and the process groups of one dry run."""

    def __init__(self) -> None:
        self.shadows = WeakTensorKeyDictionary()  # meta tensor -> real CPU copy of its values
        self.modules = ModTracker()
        self.live: dict = {}  # storage key -> (bytes, tag)
        self.live_by_tag: dict = {"activations": 0, "temporaries": 0}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak: dict = {}
        self.known: dict = {}  # category -> callable returning the storages it owns now
        self.off_device: list = []  # (op, module, device, bytes)
        self.unknown_reads = 0

    # -------------------------------------------------------------- where we are
    def module(self) -> str:
        """The innermost module running and the project's innermost lines calling, e.g.
        ``GPTModel.layers.0.self_attn (megatron_seed/model/layers.py:63 <- megatron_seed/model/attention.py:210 <- ...)``."""
        names = [p for p in self.modules.parents if p != "Global"]
        return f"{max(names, key=len) if names else 'no module'} ({_call_site()})"

    def tag(self) -> str:
        return "activations" if len(self.modules.parents) > 1 else "temporaries"

    # -------------------------------------------------------------- memory
    def track(self, t: torch.Tensor, op: str) -> None:
        if t.device != RUN_DEVICE:
            self.off_device.append((op, self.module(), str(t.device), t.untyped_storage().nbytes()))
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        nbytes, tag = storage.nbytes(), self.tag()
        self.live[key] = (nbytes, tag)
        self.live_by_tag[tag] += nbytes
        self.live_bytes += nbytes
        weakref.finalize(storage, self._free, key)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak = self._split()

    def _free(self, key: int) -> None:
        nbytes, tag = self.live.pop(key, (0, None))
        if tag is not None:
            self.live_by_tag[tag] -= nbytes
            self.live_bytes -= nbytes

    def _split(self) -> dict:
        out = {c: 0 for c in CATEGORIES}
        rest = dict(self.live_by_tag)
        seen: set = set()
        for category, storages in self.known.items():
            for storage in storages():
                key = storage._cdata
                if key in seen or key not in self.live:
                    continue
                seen.add(key)
                nbytes, tag = self.live[key]
                out[category] += nbytes
                rest[tag] -= nbytes
        out["activations"] += rest["activations"]
        out["temporaries"] += rest["temporaries"]
        return out

    def start_phase(self) -> None:
        self.peak_bytes = self.live_bytes
        self.peak = self._split()

    def snapshot(self) -> dict:
        """The current phase's peak so far: ``{category: bytes, "total": bytes}``."""
        return {**self.peak, "total": self.peak_bytes}

    # -------------------------------------------------------------- values
    def shadow(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        return self.shadows.get(t) if t.device == RUN_DEVICE else t

    def set_shadow(self, t: torch.Tensor, value: Optional[torch.Tensor]) -> None:
        if value is None or t.numel() > SHADOW_LIMIT:
            self.shadows.pop(t, None)
        else:
            self.shadows[t] = value


_ACTIVE: Optional[_Run] = None
_REPO = str(Path(__file__).resolve().parents[2]) + os.sep
# A virtual environment inside the checkout (``make setup`` makes ``.venv`` there) is not the project's code.
_LIBRARIES = tuple({os.path.join(p, "") for p in (sys.prefix, sys.base_prefix, *site.getsitepackages())})


def _call_site(depth: int = 3) -> str:
    """``path:line`` of the ``depth`` innermost frames in the project's code outside this file, innermost first."""
    frames = [f"{f.filename[len(_REPO):]}:{f.lineno}" for f in reversed(traceback.extract_stack())
              if f.filename.startswith(_REPO) and not f.filename.startswith(_LIBRARIES) and f.filename != __file__]
    return " <- ".join(frames[:depth]) or "outside the project"


def _active() -> _Run:
    if _ACTIVE is None:
        raise DryRunError("the dryrun process group is used outside megatron_seed.plan.dry_run.dry_run()")
    return _ACTIVE


# ----------------------------------------------------------------------------- process group


def _untracked():
    """Work on the real copies of values outside the dispatch mode (it would count them as the program's)."""
    return torch.utils._python_dispatch._disable_current_modes()


@contextlib.contextmanager
def host_values() -> Iterator[None]:
    """Build real host tensors inside a phase, as a job's inputs reach it from the host (a data loader, a
    rollout batch): not the program's device memory, and their values move with them to the device."""
    with _untracked():
        yield


def _completed() -> dist.Work:
    future = torch.futures.Future()
    future.set_result(None)
    return torch._C._distributed_c10d._create_work_from_future(future)


class DryRunProcessGroup(dist.ProcessGroup):
    """No communication; checks that a real backend would accept each call (see the module docstring).

    Values of shadowed tensors (see :class:`_Run`) follow the collective as if every rank
    held this rank's values: a sum multiplies by the group size, a gather repeats.
    """

    def __init__(self, rank: int, size: int):
        super().__init__(rank, size)
        self._rank, self._size = rank, size

    def size(self) -> int:
        return self._size

    def getBackendName(self) -> str:
        return "dryrun"

    def _check(self, what: str, tensors: list) -> None:
        run = _active()
        for t in tensors:
            if t.device != RUN_DEVICE:
                raise DryRunError(
                    f"{what} over a group of {self._size} got a tensor of shape {tuple(t.shape)} on {t.device} "
                    f"(the rank's device is {RUN_DEVICE}), in {run.module()}: NCCL reduces device tensors only; "
                    "fix: create it on ParallelState.device (see megatron_seed.parallel.mappings.reduce_scalars)"
                )

    # -------------------------------------------------------------- reductions
    def allreduce(self, tensors, opts=None):
        self._check("all_reduce", tensors)
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        run = _active()
        for t in tensors:
            value = run.shadow(t)
            if value is not None and op == dist.ReduceOp.SUM:
                with _untracked():
                    value.mul_(self._size)
        return _completed()

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        for out, parts in zip(outputs, input_lists):
            self._check("reduce_scatter", [out, *parts])
            if len(parts) != self._size or any(p.shape != out.shape for p in parts):
                raise DryRunError(f"reduce_scatter over {self._size} ranks: output {tuple(out.shape)}, inputs {[tuple(p.shape) for p in parts]}")
            _active().set_shadow(out, None)
        return _completed()

    def _reduce_scatter_base(self, output, input, opts=None):
        self._check("reduce_scatter_tensor", [output, input])
        if input.numel() != output.numel() * self._size:
            raise DryRunError(f"reduce_scatter_tensor over {self._size} ranks: input {tuple(input.shape)} is not {self._size} x output {tuple(output.shape)}")
        _active().set_shadow(output, None)
        return _completed()

    # -------------------------------------------------------------- gathers
    def allgather(self, output_lists, inputs, opts=None):
        run = _active()
        for outs, inp in zip(output_lists, inputs):
            self._check("all_gather", [*outs, inp])
            if len(outs) != self._size or any(o.shape != inp.shape for o in outs):
                raise DryRunError(f"all_gather over {self._size} ranks: input {tuple(inp.shape)}, outputs {[tuple(o.shape) for o in outs]}")
            value = run.shadow(inp)
            for o in outs:
                with _untracked():
                    run.set_shadow(o, None if value is None else value.clone())
        return _completed()

    def _allgather_base(self, output, input, opts=None):
        self._check("all_gather_into_tensor", [output, input])
        if output.numel() != input.numel() * self._size:
            raise DryRunError(f"all_gather_into_tensor over {self._size} ranks: output {tuple(output.shape)} is not {self._size} x input {tuple(input.shape)}")
        _active().set_shadow(output, None)
        return _completed()

    def alltoall_base(self, output, input, output_splits, input_splits, opts=None):
        self._check("all_to_all_single", [output, input])
        rows_in, rows_out = input.shape[0] if input.dim() else 1, output.shape[0] if output.dim() else 1
        in_splits = list(input_splits) or [rows_in // self._size] * self._size
        out_splits = list(output_splits) or [rows_out // self._size] * self._size
        if sum(in_splits) != rows_in or sum(out_splits) != rows_out or len(in_splits) != self._size or len(out_splits) != self._size:
            raise DryRunError(
                f"all_to_all_single over {self._size} ranks in {_active().module()}: input {tuple(input.shape)} with splits {in_splits}, "
                f"output {tuple(output.shape)} with splits {out_splits}"
            )
        # every peer routes like this rank, so peer j sends us as many rows as we send to ourselves
        mine = in_splits[self._rank]
        if any(s != mine for s in out_splits):
            raise DryRunError(
                f"all_to_all_single over {self._size} ranks in {_active().module()}: this rank expects {out_splits} rows from its peers, "
                f"but a peer routing like this rank sends {mine}"
            )
        run = _active()
        value = run.shadow(input)
        if value is not None:
            start = sum(in_splits[: self._rank])
            with _untracked():
                run.set_shadow(output, value[start:start + mine].repeat((self._size,) + (1,) * (value.dim() - 1)))
        else:
            run.set_shadow(output, None)
        return _completed()

    # -------------------------------------------------------------- the rest
    def broadcast(self, tensors, opts=None):
        self._check("broadcast", tensors)
        return _completed()

    def send(self, tensors, dst, tag):
        self._check("send", tensors)
        return _completed()

    def recv(self, tensors, src, tag):
        self._check("recv", tensors)
        for t in tensors:
            _active().set_shadow(t, None)
        return _completed()

    def barrier(self, opts=None):
        return _completed()


def _create_dryrun_pg(store, rank: int, size: int, timeout) -> DryRunProcessGroup:
    return DryRunProcessGroup(rank, size)


if "dryrun" not in dist.Backend.backend_list:
    dist.Backend.register_backend("dryrun", _create_dryrun_pg, devices=["cpu", "cuda", "meta"])


# ----------------------------------------------------------------------------- dispatch mode


def _is_write(func) -> list:
    return [i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


_HOST_READS = {torch.ops.aten._local_scalar_dense.default}


class DryRunMode(TorchDispatchMode):
    """Device checks, off-device byte counts, memory accounting and small-value tracking."""

    def __init__(self, run: _Run):
        super().__init__()
        self.run = run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        run = self.run
        flat = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {t.device for t in flat if t.dim() > 0}
        if len(devices) > 1:
            shapes = ", ".join(f"{tuple(t.shape)} on {t.device}" for t in flat if t.dim() > 0)
            raise DryRunError(f"{func} in {run.module()} mixes devices: {shapes}; fix: create every tensor on ParallelState.device")
        if func in _HOST_READS and flat[0].device == RUN_DEVICE:
            return self._host_read(flat[0])
        if func is torch.ops.aten._to_copy.default and flat[0].device == RUN_DEVICE and kwargs.get("device", RUN_DEVICE) != RUN_DEVICE:
            value = run.shadow(flat[0])
            with _untracked():
                if value is None:
                    run.unknown_reads += 1
                    value = torch.ones(flat[0].shape, dtype=flat[0].dtype)
                elif value.is_floating_point() and value.isnan().any():
                    run.unknown_reads += 1
                    value = value.nan_to_num(1.0, 1.0, 1.0)
                return value.to(dtype=kwargs.get("dtype") or flat[0].dtype)
        shadow_out = self._shadow_call(func, args, kwargs, flat)
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as e:
            if shadow_out is None:
                raise DryRunError(f"{func} in {run.module()} failed: {e}") from e
            out = pytree.tree_map(lambda v: torch.empty(v.shape, dtype=v.dtype, device=RUN_DEVICE) if isinstance(v, torch.Tensor) else v, shadow_out)
        outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        for o in outs:
            run.track(o, str(func))
        if shadow_out is not None:
            for o, v in zip(outs, [v for v in pytree.tree_leaves(shadow_out) if isinstance(v, torch.Tensor)]):
                if o.device == RUN_DEVICE:
                    run.set_shadow(o, v)
        else:
            for i in _is_write(func):
                if i < len(args) and isinstance(args[i], torch.Tensor):
                    run.set_shadow(args[i], None)
        return out

    def _host_read(self, t: torch.Tensor):
        value = self.run.shadow(t)
        with _untracked():
            if value is None or (value.is_floating_point() and value.isnan().item()):
                self.run.unknown_reads += 1
                return False if t.dtype == torch.bool else 1
            return value.item()

    def _shadow_call(self, func, args, kwargs, flat: list):
        """The op on real copies, when every meta operand has one (or is a floating-point number that
        becomes NaN beside operands that have one) and the outputs are small."""
        run = self.run
        values, unknown = {}, []
        for t in flat:
            if t.device == RUN_DEVICE:
                v = run.shadows.get(t)
                if v is None:
                    if not t.is_floating_point() or t.numel() != 1:
                        return None
                    unknown.append(t)
                else:
                    values[id(t)] = v
        if unknown:
            if not values:
                return None
            with _untracked():
                values.update((id(t), torch.full(t.shape, float("nan"), dtype=t.dtype)) for t in unknown)
        if func in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
                    torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty_strided.default):
            return None
        if not flat and kwargs.get("device") != RUN_DEVICE:
            return None

        def real(a):
            if isinstance(a, torch.Tensor):
                return values.get(id(a), a)
            if isinstance(a, torch.device) and a == RUN_DEVICE:
                return torch.device("cpu")
            return a

        real_kwargs = pytree.tree_map(real, kwargs)
        if real_kwargs.get("device") == RUN_DEVICE:
            real_kwargs["device"] = torch.device("cpu")
        numel_out = 0
        with _untracked():
            try:
                out = func(*pytree.tree_map(real, args), **real_kwargs)
            except Exception:  # the meta op raises the same error, with the module named
                return None
            for o in pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    if unknown and not o.is_floating_point():
                        return None
                    numel_out += o.numel()
        return out if numel_out <= SHADOW_LIMIT else None


# ----------------------------------------------------------------------------- attention


class GpuAttentionMode(TorchFunctionMode):
    """``scaled_dot_product_attention`` through the kernels a GPU selects, not the meta device's
    math decomposition (which keeps the ``S x S`` probabilities): flash attention (causal, no
    mask; grouped kv heads natively), else memory-efficient attention with the boolean mask as
    an additive bias and, under autograd, kv heads repeated as torch does for it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        is_causal = kwargs.get("is_causal", False)
        scale = kwargs.get("scale")
        if mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, scale=scale)[0]
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else mask
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if grad and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, grad, 0.0, is_causal, scale=scale)[0]


# ----------------------------------------------------------------------------- report


@dataclass
class DryRunReport:
    """Peak memory of one rank by phase and category (bytes), and what ran off the device."""

    world: int
    rank: int
    coordinates: dict
    phases: dict = field(default_factory=dict)  # phase -> {category: bytes at the phase's peak, "total": peak}
    sections: dict = field(default_factory=dict)  # "phase/section" -> the same, for parts of a phase (train's forward_backward)
    off_device: list = field(default_factory=list)  # (op, module, device, bytes)
    unknown_reads: int = 0

    def peak(self) -> dict:
        """Per category, the largest amount any phase holds at its peak; ``total``: the largest peak."""
        out = {c: max((p[c] for p in self.phases.values()), default=0) for c in CATEGORIES}
        out["total"] = max((p["total"] for p in self.phases.values()), default=0)
        return out

    def table(self) -> str:
        unit, size = ("GiB", 2**30) if self.peak()["total"] >= 2**30 else ("MiB", 2**20)
        head = f"{'phase':<11}" + "".join(f"{c:>17}" for c in CATEGORIES) + f"{'peak':>12}"
        lines = [f"rank {self.rank} of {self.world} {self.coordinates}, {unit} at each phase's peak", head, "-" * len(head)]
        for name, p in [*self.phases.items(), *((f"  {k.split('/')[1]}", v) for k, v in self.sections.items())]:
            lines.append(f"{name:<11}" + "".join(f"{p[c] / size:>17.2f}" for c in CATEGORIES) + f"{p['total'] / size:>12.2f}")
        off = sum(b for *_, b in self.off_device)
        lines.append(f"allocated off the device: {len(self.off_device)} tensors, {off / 2**20:.2f} MiB"
                     + (f" (first: {self.off_device[0][0]} in {self.off_device[0][1]})" if self.off_device else ""))
        lines.append(f"host reads of values the dry run cannot know (read as 1): {self.unknown_reads}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- phases


@dataclass
class DryRunState:
    """What the phases share: the config, the groups, the rank's trainers (model chunks + optimizer;
    ``trainers[0]`` the LM trainer, or the actor and critic once the PPO phase replaced it), model
    chunks without an optimizer (``frozen``: the PPO reference policy) and the rollout's KV cache
    while it lives. The memory categories are read from here."""

    cfg: Config
    ps: object
    run: _Run
    trainers: list = field(default_factory=list)
    frozen: list = field(default_factory=list)
    kv_cache: object = None
    sections: dict = field(default_factory=dict)  # "phase/section" -> peak by category (see train_phase)

    @property
    def trainer(self):
        return self.trainers[0]

    def params(self) -> list:
        return [p for m in [*(c for t in self.trainers for c in t.chunks), *self.frozen] for p in m.parameters()]


def _storages(tensors) -> list:
    return [t.untyped_storage() for t in tensors if t is not None]


def build_phase(cfg: Config, world: int, rank: int, run: _Run) -> DryRunState:
    """Groups, model chunks on the run's device and the optimizer, as ``megatron-seed train`` builds them.

    Reported where it ends (the build only allocates), split by what is then known.
    """
    from megatron_seed.parallel.state import ParallelState
    from megatron_seed.train.trainer import Trainer

    ps = ParallelState.build(cfg.parallel, world, rank, device=RUN_DEVICE)
    state = DryRunState(cfg, ps, run, [Trainer(cfg, ps)])
    run.known["parameters"] = lambda: _storages(state.params())
    run.known["gradients"] = lambda: _storages([*(p.grad for p in state.params()),
                                                *(g for tr in state.trainers for g in tr.optimizer.reducing_gradients())])
    run.known["optimizer_states"] = lambda: _storages(t for tr in state.trainers for t in tr.optimizer.state_tensors())
    run.known["kv_cache"] = lambda: _storages([*state.kv_cache.k.values(), *state.kv_cache.v.values(), state.kv_cache.bias_BL]
                                              if state.kv_cache is not None else [])
    run.peak = run._split()
    return state


def train_phase(state: DryRunState) -> None:
    """One LM train step: forward and backward of every micro-batch, grad reduction, optimizer step.

    Besides the step's peak, the sections ``train/fwd_bwd`` (up to the optimizer step:
    the activations' peak, what the planner's activation model predicts) and
    ``train/opt_step`` are recorded in ``state.sections``."""
    from megatron_seed.train.trainer import lm_batch

    t, run, optimizer = state.cfg.train, state.run, state.trainer.optimizer
    tokens_BS1 = torch.zeros(state.trainer.local_batch_size, t.seq_len + 1, dtype=torch.long, device=RUN_DEVICE)
    step = optimizer.step

    def observed_step(*args, **kwargs):
        fwd_bwd = state.sections["train/fwd_bwd"] = run.snapshot()
        run.start_phase()
        try:
            return step(*args, **kwargs)
        finally:
            state.sections["train/opt_step"] = run.snapshot()
            if fwd_bwd["total"] > run.peak_bytes:  # the phase's peak is the larger section's
                run.peak, run.peak_bytes = {c: fwd_bwd[c] for c in CATEGORIES}, fwd_bwd["total"]

    optimizer.step = observed_step  # an instance attribute over the class's method, for this step only
    try:
        state.trainer.train_step(lm_batch(tokens_BS1))
    finally:
        del optimizer.step


def rollout_phase(state: DryRunState) -> None:
    """A rollout prefill and one decode step of the policy, as the rollout engine runs them: a batch of
    ``rl.prompts_per_step x rollout.samples_per_prompt / dp`` prompts of ``train.seq_len -
    rollout.max_new_tokens`` tokens, in a cache of ``train.seq_len`` slots."""
    from megatron_seed.parallel.tensor_parallel import vocab_parallel_argmax

    cfg, ps = state.cfg, state.ps
    if len(state.trainer.chunks) != 1:
        raise DryRunError(f"rollout: the rollout engine generates with one model chunk per rank, this rank holds "
                          f"{len(state.trainer.chunks)} (parallel.virtual_pp={cfg.parallel.virtual_pp}); fix: --set parallel.virtual_pp=1")
    (model,) = state.trainer.chunks
    B = cfg.rl.prompts_per_step * cfg.rollout.samples_per_prompt // max(ps.dp_size, 1) or 1
    new = cfg.rollout.max_new_tokens
    prompt = max(1, cfg.train.seq_len - new)
    prompt = -(-prompt // ps.tp_size) * ps.tp_size
    model.eval()
    cache = state.kv_cache = model.allocate_kv_cache(B, prompt + new)
    sequence_parallel, ps.sequence_parallel = ps.sequence_parallel, False  # generation runs without it (rl/rollout/engine.py)
    with torch.no_grad():
        for S in (prompt, 1):
            ids_BS = torch.zeros(B, S, dtype=torch.long, device=RUN_DEVICE)
            if model.pre_process:
                out = model(ids_BS, kv_cache=cache)
            else:
                hidden = torch.empty(B, S, cfg.model.hidden_size, dtype=next(model.parameters()).dtype, device=RUN_DEVICE)
                dist.recv(hidden, src=ps.global_rank("pp", ps.pp_rank - 1), group=ps.group("pp"))
                out = model(hidden_BSH=hidden, kv_cache=cache)
            if model.post_process:
                vocab_parallel_argmax(out[:, -1], ps)
            else:
                dist.send(out.contiguous(), dst=ps.global_rank("pp", ps.pp_rank + 1), group=ps.group("pp"))
    ps.sequence_parallel = sequence_parallel
    model.train()
    state.kv_cache = None


def checkpoint_phase(state: DryRunState) -> None:
    """The state dicts a checkpoint save writes (model chunks and the optimizer's shard)."""
    trainer = state.trainer
    {"model": [m.state_dict() for m in trainer.chunks], "optimizer": trainer.optimizer.state_dict()}


PHASE_FUNCTIONS = {"train": train_phase, "rollout": rollout_phase, "checkpoint": checkpoint_phase}


# ----------------------------------------------------------------------------- the run


class UnknownValues(dict):
    """Python objects sent by another rank, which a one-rank dry run cannot know: every key reads 1.0."""

    def __missing__(self, key):
        return 1.0


def _broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
    source = group_src == dist.get_rank(group) if group_src is not None else src == dist.get_rank()
    if not source:
        object_list[:] = [UnknownValues() for _ in object_list]


def _all_gather_object(object_list, obj, group=None):
    object_list[:] = [copy.deepcopy(obj) for _ in object_list]  # every peer as this rank


def _gather_object(obj, object_gather_list=None, dst=None, group=None, group_dst=None):
    if object_gather_list is not None:
        object_gather_list[:] = [copy.deepcopy(obj) for _ in object_gather_list]


@contextlib.contextmanager
def _dryrun_world(world: int, rank: int) -> Iterator[_Run]:
    """torch.distributed on the dryrun backend, with the object collectives (pickles in byte tensors,
    which need the peer's real bytes) answered as :class:`UnknownValues` or this rank's objects."""
    global _ACTIVE
    if dist.is_initialized():
        raise DryRunError("dry run: torch.distributed is already initialised in this process; run it in a fresh process")
    run = _Run()
    _ACTIVE = run
    dist.init_process_group("dryrun", store=FakeStore(), rank=rank, world_size=world)
    try:
        with contextlib.ExitStack() as stack:
            for name, fn in (("broadcast_object_list", _broadcast_object_list), ("all_gather_object", _all_gather_object),
                             ("gather_object", _gather_object)):
                stack.enter_context(mock.patch.object(dist, name, fn))
            stack.enter_context(run.modules)
            yield run
    finally:
        dist.destroy_process_group()
        _ACTIVE = None


def dry_run_config(cfg: Config) -> Config:
    """The config a dry run executes: the same, with balanced routing forced (see the module docstring)
    and ``train.precision=auto`` resolved as on a GPU (bf16); ``cfg`` itself is left as it is."""
    cfg = copy.deepcopy(cfg)
    cfg.model.moe.router_force_balance = True
    cfg.train.progress = False
    if cfg.train.precision == "auto":  # as on the GPUs the run stands for
        cfg.train.precision = "bf16"
    return cfg


def dry_run(cfg: Config, world: int, rank: int, phases: tuple = ("train", "rollout", "checkpoint"),
            extra_phases: Optional[dict] = None) -> DryRunReport:
    """Build rank ``rank`` of a ``world``-rank job of ``cfg`` on meta tensors, then run ``phases``.

    ``extra_phases`` maps more phase names to ``fn(state: DryRunState)`` (layers above this
    one add theirs, e.g. PPO). Raises :class:`DryRunError` (naming the op and module) on a
    device mismatch, a shape error or collective sizes that cannot match; returns the
    per-phase peak memory otherwise.
    """
    functions = {**PHASE_FUNCTIONS, **(extra_phases or {})}
    unknown = [p for p in phases if p not in functions]
    if unknown:
        raise ConfigError(f"dry run phases {unknown}: unknown; choose from {', '.join(functions)}")
    if not 0 <= rank < world:
        raise ConfigError(f"dry run --rank {rank}: must be in [0, {world}) for --world-size {world}")
    cfg = dry_run_config(cfg)
    with _dryrun_world(world, rank) as run, GpuAttentionMode(), DryRunMode(run):
        run.start_phase()
        state = build_phase(cfg, world, rank, run)
        report = DryRunReport(world, rank, state.ps.coordinates())
        report.phases["build"] = {**run.peak, "total": run.peak_bytes}
        for phase in phases:
            run.start_phase()
            functions[phase](state)
            report.phases[phase] = {**run.peak, "total": run.peak_bytes}
        report.sections = dict(state.sections)
        report.off_device = list(run.off_device)
        report.unknown_reads = run.unknown_reads
    return report


def peak_memory(cfg: Config, world: int, rank: int, phases: tuple = ("train", "rollout", "checkpoint"),
                extra_phases: Optional[dict] = None) -> dict:
    """Bytes per category (``parameters``, ``gradients``, ``optimizer_states``, ``activations``,
    ``kv_cache``, ``temporaries``, and the overall peak ``total``) of rank ``rank``: what the
    planner's memory model is compared against."""
    return dry_run(cfg, world, rank, phases, extra_phases).peak()
