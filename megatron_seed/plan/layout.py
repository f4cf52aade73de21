"""Parallel layouts the planner considers: (tp, pp, vpp, ep, etp, dp, cp), checked and enumerated.

A layout is checked by the same rules a real run is checked by (``validate_parallel`` and
``Layout.from_config``: heads, experts and ffn divisible, world size = tp * cp * dp * pp,
ep * etp dividing a stage's ranks) plus the workload's: the global batch splits into
micro-batches over dp, the sequence splits over tp (sequence parallel) and cp, and
interleaved pipelines get a multiple of pp micro-batches. Sequence parallelism is on
whenever tp > 1 (as Megatron-core requires with MoE).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterator

from megatron_seed.config import ConfigError, ModelConfig, ParallelConfig, validate_parallel
from megatron_seed.parallel.state import Layout
from megatron_seed.plan.inputs import Cluster, Workload


@dataclass(frozen=True)
class PlanLayout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    cp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @functools.cached_property
    def edp(self) -> int:
        """Expert data-parallel size: a stage's tp * cp * dp ranks re-read as etp * ep * edp, as a run
        derives it (``Layout.from_config``, which refuses a layout ep * etp does not divide)."""
        return Layout.from_config(self.parallel_config(), self.world).edp

    def parallel_config(self, zero1: bool = True) -> ParallelConfig:
        return ParallelConfig(
            tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp, dp=self.dp, cp=self.cp,
            sequence_parallel=self.tp > 1, virtual_pp=self.vpp,
            pp_schedule="interleaved" if self.vpp > 1 else "1f1b", zero1=zero1,
        )

    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} VPP{self.vpp} EP{self.ep} ETP{self.etp} DP{self.dp} CP{self.cp}"

    def micro_batches(self, w: Workload) -> int:
        return w.global_batch // (w.micro_batch * self.dp)


LAYOUT_KEYS = ("tp", "pp", "vpp", "ep", "etp", "dp", "cp")


def parse_layout(text: str, gpus: int) -> PlanLayout:
    """``tp=2,pp=8,vpp=4,ep=32`` (omitted sizes are 1; dp defaults to what the GPU count leaves)."""
    sizes: dict = {}
    for item in filter(None, re.split(r"[,\s]+", text.strip())):
        key, _, raw = item.partition("=")
        key = key.lower()
        if key not in LAYOUT_KEYS or not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"--layout {text!r}: bad item {item!r}; fix: write e.g. tp=2,pp=8,vpp=4,ep=32 "
                              f"(sizes >= 1 from {', '.join(LAYOUT_KEYS)})")
        sizes[key] = int(raw)
    if "dp" not in sizes:
        model_parallel = sizes.get("tp", 1) * sizes.get("cp", 1) * sizes.get("pp", 1)
        if gpus % model_parallel:
            raise ConfigError(f"--layout {text!r}: tp*cp*pp = {model_parallel} does not divide --gpus={gpus}; "
                              f"fix: pick tp, cp, pp whose product divides {gpus}")
        sizes["dp"] = gpus // model_parallel
    return PlanLayout(**sizes)


def check_layout(layout: PlanLayout, m: ModelConfig, w: Workload, c: Cluster) -> None:
    """Raise ConfigError naming what is wrong with ``layout`` for this model, workload and cluster."""
    p = layout.parallel_config(w.zero1)
    validate_parallel(p, m)
    if layout.world != c.gpus:
        raise ConfigError(f"layout {layout.label()} uses tp*cp*dp*pp = {layout.world} GPUs, not --gpus={c.gpus}; "
                          f"fix: choose sizes whose product is {c.gpus} (or omit dp to derive it)")
    Layout.from_config(p, c.gpus)
    if layout.tp > c.gpus_per_node:
        raise ConfigError(f"tp={layout.tp} spans more than one {c.gpus_per_node}-GPU node; fix: keep tp <= {c.gpus_per_node}")
    if w.global_batch % (w.micro_batch * layout.dp):
        raise ConfigError(f"--global-batch={w.global_batch} is not divisible by micro-batch x dp = {w.micro_batch} x {layout.dp}; "
                          f"fix: make it a multiple of {w.micro_batch * layout.dp}")
    split = layout.tp * layout.cp
    if w.seq_len % split:
        raise ConfigError(f"--seq-len={w.seq_len} is not divisible by tp*cp = {split} (sequence parallel and context parallel "
                          f"split it); fix: a multiple of {split}")
    if layout.vpp > 1 and layout.micro_batches(w) % layout.pp:
        raise ConfigError(f"vpp={layout.vpp}: the interleaved schedule needs micro-batches per step "
                          f"({layout.micro_batches(w)}) to be a multiple of pp={layout.pp}; fix: change --global-batch or --micro-batch")
    if w.rollout_batch and w.rollout_batch % layout.dp:
        raise ConfigError(f"--rollout-batch={w.rollout_batch} is not divisible by dp={layout.dp}; fix: a multiple of {layout.dp}")


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(m: ModelConfig, w: Workload, c: Cluster, max_vpp: int = 8, max_cp: int = 1) -> Iterator[PlanLayout]:
    """Every layout that passes :func:`check_layout` for ``c.gpus`` GPUs: tp within a node, etp up to 8,
    vpp up to ``max_vpp``, cp up to ``max_cp`` (1 by default: the cp communication model, an all-gather
    of each layer's keys and values, has not been checked against the zig-zag implementation)."""
    has_moe = m.num_dense_layers < m.num_layers
    for tp in [d for d in _divisors(c.gpus_per_node) if c.gpus % d == 0]:
        for cp in [d for d in (1, 2, 4, 8, 16) if d <= max_cp and c.gpus % (tp * d) == 0]:
            for pp in [d for d in _divisors(c.gpus // (tp * cp)) if d <= m.num_layers]:
                dp = c.gpus // (tp * cp * pp)
                stage = tp * cp * dp
                for vpp in ([1] if pp == 1 else [v for v in range(1, max_vpp + 1) if pp * v <= m.num_layers]):
                    for etp in ([d for d in (1, 2, 4, 8) if stage % d == 0] if has_moe else [1]):
                        for ep in ([d for d in _divisors(stage // etp) if m.moe.num_experts % d == 0] if has_moe else [1]):
                            layout = PlanLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dp=dp, cp=cp)
                            try:
                                check_layout(layout, m, w, c)
                            except ConfigError:
                                continue
                            yield layout
