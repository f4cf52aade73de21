"""Process groups for every parallel dimension, built once from the layout.

Rank order follows Megatron-core, so a layout maps one to one onto Megatron-LM's:

* dense ranks:  ``tp`` fastest, then ``cp``, ``dp``, ``pp``  (world = tp * cp * dp * pp)
* expert ranks: ``etp`` fastest, then ``ep``, ``edp``, ``pp`` (same pp; edp derived)

so for each pipeline stage the tp * cp * dp dense ranks are re-read as
etp * ep * edp expert ranks. Experts are sharded over ep * etp and replicated over
edp; dense weights are sharded over tp (and pp) and replicated over dp * cp.

A single process needs no ``torch.distributed``: every group is then ``None`` and
every collective in :mod:`megatron_seed.parallel.mappings` is the identity.

Every tensor of a rank lives on ``ParallelState.device`` (``parallel.device``): under
NCCL ``cuda:LOCAL_RANK``, under gloo ``cpu``, in one process ``cuda`` when a GPU is
visible; the memory-free dry run (:mod:`megatron_seed.plan.dry_run`) uses ``meta``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_seed.config import ConfigError, ParallelConfig

Group = Optional[dist.ProcessGroup]


class LayoutError(ConfigError):
    """The parallel layout does not fit the world size."""


def _strides(sizes: list) -> list:
    out, acc = [], 1
    for s in sizes:
        out.append(acc)
        acc *= s
    return out


def rank_coordinates(rank: int, sizes: list) -> list:
    """Coordinates of ``rank`` in a grid whose first dimension varies fastest."""
    return [(rank // stride) % size for stride, size in zip(_strides(sizes), sizes)]


def orthogonal_groups(sizes: list, mask: list) -> list:
    """All rank groups that vary along the dims where ``mask`` is True.

    Ranks in one group share every unmasked coordinate; within a group ranks are
    ordered by the masked coordinates (first dim fastest), as Megatron-core does.
    """
    world = 1
    for s in sizes:
        world *= s
    groups: dict = {}
    for rank in range(world):
        coords = rank_coordinates(rank, sizes)
        key = tuple(c for c, m in zip(coords, mask) if not m)
        groups.setdefault(key, []).append(rank)
    return [groups[k] for k in sorted(groups, key=lambda k: min(groups[k]))]


@dataclass(frozen=True)
class Layout:
    """Sizes of every dimension, checked against the world size."""

    world: int
    tp: int
    cp: int
    dp: int
    pp: int
    ep: int
    etp: int
    edp: int

    @classmethod
    def from_config(cls, p: ParallelConfig, world: int) -> "Layout":
        model_parallel = p.tp * p.cp * p.pp
        if world % model_parallel:
            raise LayoutError(
                f"world size {world} is not divisible by tp*cp*pp = {p.tp}*{p.cp}*{p.pp} = {model_parallel}; "
                f"fix: launch a multiple of {model_parallel} processes or change the layout"
            )
        dp = world // model_parallel
        if p.dp and p.dp != dp:
            raise LayoutError(
                f"parallel.dp={p.dp} but world size {world} / (tp*cp*pp = {model_parallel}) = {dp}; "
                f"fix: set parallel.dp={dp} (or 0 to derive it) or launch {p.dp * model_parallel} processes"
            )
        dense_per_stage = p.tp * p.cp * dp
        expert_mp = p.ep * p.etp
        if dense_per_stage % expert_mp:
            raise LayoutError(
                f"ep*etp = {p.ep}*{p.etp} = {expert_mp} does not divide the {dense_per_stage} ranks of a pipeline stage "
                f"(tp*cp*dp = {p.tp}*{p.cp}*{dp}); fix: pick ep*etp dividing {dense_per_stage}"
            )
        return cls(world, p.tp, p.cp, dp, p.pp, p.ep, p.etp, dense_per_stage // expert_mp)

    @property
    def dense_sizes(self) -> list:
        return [self.tp, self.cp, self.dp, self.pp]

    @property
    def expert_sizes(self) -> list:
        return [self.etp, self.ep, self.edp, self.pp]


def resolve_device(setting: str, backend: Optional[str]) -> torch.device:
    """The device of a rank: ``parallel.device`` unless ``auto``; ``auto`` is ``cuda:LOCAL_RANK``
    under NCCL, ``cpu`` under any other backend, and in one process (``backend`` None)
    ``cuda`` when a GPU is visible, else ``cpu``.

    NCCL reduces CUDA tensors only, so ``nccl`` with a non-CUDA device is refused here,
    before a first collective would fail on it.
    """
    if setting == "auto":
        if backend == "nccl":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if backend is None and torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")
    device = torch.device(setting)
    if backend == "nccl" and device.type != "cuda":
        raise LayoutError(
            f"parallel.device={setting!r} under the nccl backend: NCCL reduces CUDA tensors only; "
            "fix: set parallel.device=auto (cuda:LOCAL_RANK) or parallel.backend=gloo"
        )
    return device


# Every group a ParallelState holds; asking for another name is a bug (a typo would otherwise
# turn a reduction into a silent no-op).
GROUP_NAMES = ("world", "tp", "cp", "dp", "dp_cp", "pp", "model_parallel", "etp", "ep", "edp", "expert_model_parallel")


@dataclass
class ParallelState:
    """Every process group of a run, this rank's coordinates and its device.

    Groups: ``world`` (every rank), ``tp``, ``cp``, ``dp`` (dense data parallel),
    ``dp_cp`` (gradient reduction when cp > 1), ``pp``, ``model_parallel`` (tp x pp),
    ``ep``, ``etp``, ``edp`` (expert data parallel) and ``expert_model_parallel``
    (etp x ep). In one process every group is ``None`` and has size 1. A name outside
    :data:`GROUP_NAMES` raises ``KeyError``.
    """

    layout: Layout
    rank: int = 0
    groups: dict = field(default_factory=dict)
    group_ranks: dict = field(default_factory=dict)
    sequence_parallel: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls, sequence_parallel: bool = False, device: str = "cpu") -> "ParallelState":
        """One process, no torch.distributed needed."""
        return cls.unconnected(Layout(1, 1, 1, 1, 1, 1, 1, 1), sequence_parallel, torch.device(device))

    @classmethod
    def unconnected(cls, layout: Layout, sequence_parallel: bool, device: torch.device) -> "ParallelState":
        """Every group ``None`` (size 1, rank 0): one process, or a layout read without groups."""
        return cls(layout, 0, {n: None for n in GROUP_NAMES}, {n: [0] for n in GROUP_NAMES}, sequence_parallel, device)

    @classmethod
    def build(cls, p: ParallelConfig, world: Optional[int] = None, rank: Optional[int] = None,
              device: Optional[torch.device] = None) -> "ParallelState":
        """Check the layout against the world size, then create every group.

        All ranks must call this collectively (``new_group`` is collective). ``device``
        overrides ``parallel.device`` (the dry run's ``meta``).
        """
        if world is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
        layout = Layout.from_config(p, world)
        sequence_parallel = p.sequence_parallel and p.tp > 1
        if world == 1 and not dist.is_initialized():
            return cls.unconnected(layout, sequence_parallel, device or resolve_device(p.device, None))
        device = device or resolve_device(p.device, dist.get_backend())
        rank = dist.get_rank() if rank is None else rank
        specs = {
            "tp": (layout.dense_sizes, [True, False, False, False]),
            "cp": (layout.dense_sizes, [False, True, False, False]),
            "dp": (layout.dense_sizes, [False, False, True, False]),
            "dp_cp": (layout.dense_sizes, [False, True, True, False]),
            "pp": (layout.dense_sizes, [False, False, False, True]),
            "model_parallel": (layout.dense_sizes, [True, False, False, True]),
            "etp": (layout.expert_sizes, [True, False, False, False]),
            "ep": (layout.expert_sizes, [False, True, False, False]),
            "edp": (layout.expert_sizes, [False, False, True, False]),
            "expert_model_parallel": (layout.expert_sizes, [True, True, False, False]),
        }
        groups, group_ranks = {"world": dist.group.WORLD}, {"world": list(range(world))}
        for name, (sizes, mask) in specs.items():
            for ranks in orthogonal_groups(sizes, mask):
                group = dist.new_group(ranks)  # collective: every rank creates every group
                if rank in ranks:
                    groups[name], group_ranks[name] = group, ranks
        return cls(layout, rank, groups, group_ranks, sequence_parallel, device)

    # ------------------------------------------------------------------ accessors
    def _ranks(self, name: str) -> list:
        if name not in GROUP_NAMES:
            raise KeyError(f"no process group named {name!r}; groups: {', '.join(GROUP_NAMES)}")
        return self.group_ranks[name]

    def group(self, name: str) -> Group:
        self._ranks(name)
        return self.groups[name]

    def size(self, name: str) -> int:
        return len(self._ranks(name))

    def rank_in(self, name: str) -> int:
        ranks = self._ranks(name)
        return ranks.index(self.rank) if len(ranks) > 1 else 0

    def global_rank(self, name: str, index: int) -> int:
        """Global rank of member ``index`` of this rank's group ``name``."""
        ranks = self._ranks(name)
        return ranks[index] if len(ranks) > 1 else self.rank

    @property
    def tp_group(self) -> Group:
        return self.group("tp")

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def tp_rank(self) -> int:
        return self.rank_in("tp")

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def pp_rank(self) -> int:
        return self.rank_in("pp")

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        return self.rank_in("dp")

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def ep_rank(self) -> int:
        return self.rank_in("ep")

    @property
    def etp_size(self) -> int:
        return self.layout.etp

    @property
    def etp_rank(self) -> int:
        return self.rank_in("etp")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def coordinates(self, rank: Optional[int] = None) -> dict:
        """This (or another) rank's coordinate along every dimension."""
        rank = self.rank if rank is None else rank
        tp, cp, dp, pp = rank_coordinates(rank, self.layout.dense_sizes)
        etp, ep, edp, _ = rank_coordinates(rank, self.layout.expert_sizes)
        return {"tp": tp, "cp": cp, "dp": dp, "pp": pp, "etp": etp, "ep": ep, "edp": edp}


def rank_map(layout: Layout) -> str:
    """A table saying which global rank holds which coordinate."""
    header = f"{'rank':>5} {'tp':>3} {'cp':>3} {'dp':>3} {'pp':>3} | {'etp':>3} {'ep':>3} {'edp':>3}"
    lines = [header, "-" * len(header)]
    for r in range(layout.world):
        tp, cp, dp, pp = rank_coordinates(r, layout.dense_sizes)
        etp, ep, edp, _ = rank_coordinates(r, layout.expert_sizes)
        lines.append(f"{r:>5} {tp:>3} {cp:>3} {dp:>3} {pp:>3} | {etp:>3} {ep:>3} {edp:>3}")
    return "\n".join(lines)


def init_distributed(backend: str = "auto", timeout_s: float = 300.0) -> tuple:
    """Initialise torch.distributed from torchrun/SLURM variables; returns (rank, world).

    With no launcher variables this is a single process and nothing is initialised.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" not in os.environ:
        return 0, 1
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
