"""Evaluate layouts (memory of every pipeline stage, step time) and rank the ones that fit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_seed.config import ModelConfig
from megatron_seed.plan.hardware import GIB
from megatron_seed.plan.inputs import Assumptions, Cluster, Workload
from megatron_seed.plan.layout import PlanLayout, candidate_layouts, check_layout
from megatron_seed.plan.memory import MemoryBreakdown, rank_memory
from megatron_seed.plan.timing import StepTime, step_time


@dataclass(frozen=True)
class Evaluation:
    layout: PlanLayout
    stages: list  # MemoryBreakdown of the worst (ZeRO rank 0) rank of every pipeline stage
    time: StepTime
    capacity: float  # bytes of one GPU

    @property
    def peak_stage(self) -> int:
        return max(range(len(self.stages)), key=lambda r: self.stages[r].peak)

    @property
    def peak(self) -> float:
        return self.stages[self.peak_stage].peak

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def why_not(self) -> Optional[str]:
        """None when it fits, else the largest categories of the fullest rank."""
        if self.fits:
            return None
        mem: MemoryBreakdown = self.stages[self.peak_stage]
        phase = "rollout" if mem.rollout_peak > mem.train_peak else (
            "optimizer step" if mem.optimizer_step > mem.activations + mem.moe_dispatch + mem.logits else "forward/backward")
        parts = {"parameters": mem.parameters, "gradients": mem.gradients, "optimizer": mem.optimizer}
        if phase == "rollout":
            parts.update(kv_cache=mem.kv_cache, rollout_weights=mem.rollout_weights)
        elif phase == "optimizer step":
            parts["optimizer_step"] = mem.optimizer_step
        else:
            parts.update(activations=mem.activations, moe_dispatch=mem.moe_dispatch, logits=mem.logits)
        top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        return (f"needs {self.peak / GIB:.1f} GiB > {self.capacity / GIB:.1f} GiB on pipeline stage {self.peak_stage} "
                f"({phase}): " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in top) + " GiB")


def evaluate(m: ModelConfig, layout: PlanLayout, w: Workload, c: Cluster, a: Assumptions) -> Evaluation:
    """Memory and time of one layout (raises ConfigError when the layout is not valid)."""
    check_layout(layout, m, w, c)
    stages = [rank_memory(m, layout, w, a, r) for r in range(layout.pp)]
    return Evaluation(layout, stages, step_time(m, layout, w, c, a), c.gpu.memory_bytes)


@dataclass(frozen=True)
class SearchResult:
    ranked: list  # fitting evaluations, fastest first
    dropped: list  # evaluations that do not fit, fastest first
    considered: int


def search(m: ModelConfig, w: Workload, c: Cluster, a: Assumptions, max_vpp: int = 8, max_cp: int = 1) -> SearchResult:
    evaluations = [evaluate(m, layout, w, c, a) for layout in candidate_layouts(m, w, c, max_vpp, max_cp)]
    evaluations.sort(key=lambda e: -e.time.tokens_per_s_per_gpu)
    return SearchResult([e for e in evaluations if e.fits], [e for e in evaluations if not e.fits], len(evaluations))
