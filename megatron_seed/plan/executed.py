"""The planner against the dry run ("executed" check): per-category memory of one rank, predicted
by :mod:`megatron_seed.plan.memory` and measured by :func:`megatron_seed.plan.dry_run.dry_run`.

Both sides describe the same job: the dry run executes ``cfg`` with the layout's parallel
config and the workload's batch, sequence and precision; the planner sees the dry run's
rollout (``rl.prompts_per_step x rollout.samples_per_prompt`` sequences of
``train.seq_len - rollout.max_new_tokens`` prompt tokens and ``rollout.max_new_tokens`` new
ones) and its balanced routing (``moe_imbalance = 1``); its framework overhead is left out
(the dry run has no CUDA context or allocator). The dry run reduces gradients after backward
(``parallel.overlap_grad_reduce=false``): overlapped, the fp32 chunks reduced during the last
backward would move its forward/backward peak to the end of backward, where few activations
are alive, and the planner counts those fp32 gradients in the optimizer step, where the
dry run then has them too. The dry run's cost grows with the micro-batches
it runs, so the step is cut to the fewest micro-batches with which every checked rank holds as
many forwards in flight as under the full batch (:func:`check_workload`; no category but the
step time depends on more). Compared, in bytes:

=================  ====================================================  ====================================================
category           planner                                               dry run
=================  ====================================================  ====================================================
parameters         ``parameters``                                        ``build`` phase's parameters
gradients          ``gradients``                                         gradients at the optimizer step's peak
optimizer states   ``optimizer`` (fp32 master, Adam moments, mask)        ``build`` phase's optimizer states
activations        ``activations + moe_dispatch + logits``               activations and temporaries at the peak of the
                                                                         train step's forward/backward (``train/fwd_bwd``)
optimizer step     ``optimizer_step`` (flat fp32 grads, gathers, Adam)   temporaries at the optimizer step's peak
KV cache           ``kv_cache``                                          the rollout phase's KV cache (vpp = 1 only)
train peak         ``train_peak`` less the overhead                       the train phase's peak
=================  ====================================================  ====================================================

A category agrees when ``|planner - dry run| <= TOLERANCE x max(both)``; one that does not is
reported with what each side counts there (:data:`WHAT_DIFFERS`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from megatron_seed.config import Config, ConfigError
from megatron_seed.plan.inputs import Assumptions, Workload
from megatron_seed.plan.layout import PlanLayout
from megatron_seed.parallel.state import rank_coordinates
from megatron_seed.plan.memory import MemoryBreakdown, global_rank_memory, in_flight_chunks

TOLERANCE = 0.15
WHAT_DIFFERS = {
    "parameters": "the planner counts the preset's shards from megatron_seed/params.py, the dry run the built modules",
    "gradients": "the planner keeps a gradient per parameter for the whole step; the dry run has one only where backward reached",
    "optimizer states": "the planner counts 16 B per ZeRO-1 shard element; the dry run the optimizer's state tensors",
    "activations": "the planner's per-module activation formulas (plan/memory.py) against every tensor alive at the "
                   "forward/backward peak, including loss and pipeline-receive temporaries the formulas leave out",
    "optimizer step": "the planner's flat fp32 gradients + ZeRO-1 gather + Adam temporaries against what the optimizer "
                      "allocates; gradients of the previous step and grad-norm temporaries are the usual difference",
    "KV cache": "the planner's 2 x layers x B x L x K x D against the cache the rollout engine allocates",
    "train peak": "the sum of the differences above",
}


@dataclass(frozen=True)
class CategoryCheck:
    """One category of one rank: predicted and measured bytes."""

    rank: int
    category: str
    planner: float
    dry_run: float

    @property
    def relative_error(self) -> float:
        """``(planner - dry_run) / max(planner, dry_run)``; 0 when both are 0."""
        scale = max(self.planner, self.dry_run)
        return (self.planner - self.dry_run) / scale if scale else 0.0

    @property
    def agrees(self) -> bool:
        return abs(self.relative_error) <= TOLERANCE


def dry_run_config(cfg: Config, layout: PlanLayout, w: Workload) -> Config:
    """``cfg`` as the job the planner evaluates: the layout's parallel config, the workload's step."""
    if w.recompute != "none":
        raise ConfigError(f"--recompute {w.recompute}: the dry run executes this stack, which recomputes nothing; "
                          "fix: --recompute none for --check-dry-run")
    if w.precision not in ("bf16", "fp32"):
        raise ConfigError(f"--precision {w.precision}: the dry run runs bf16 or fp32 (train.precision); fix: --precision bf16")
    out = copy.deepcopy(cfg)
    out.parallel = layout.parallel_config(w.zero1)
    out.parallel.overlap_grad_reduce = False  # see the module docstring
    out.train.seq_len, out.train.global_batch_size, out.train.micro_batch_size = w.seq_len, w.global_batch, w.micro_batch
    out.train.precision = w.precision
    return out


def check_workload(layout: PlanLayout, w: Workload, ranks: tuple) -> Workload:
    """``w`` with the fewest micro-batches per dp rank that keep the in-flight forwards of every
    rank in ``ranks`` (a multiple of pp under the interleaved schedule)."""
    M = layout.micro_batches(w)
    pp_ranks = {rank_coordinates(r, [layout.tp, layout.cp, layout.dp, layout.pp])[3] for r in ranks}
    for m in range(1, M + 1):
        if (layout.vpp == 1 or m % layout.pp == 0) and all(
                in_flight_chunks(layout, m, r) == in_flight_chunks(layout, M, r) for r in pp_ranks):
            return replace(w, global_batch=m * w.micro_batch * layout.dp)
    return w


def planner_workload(cfg: Config, w: Workload) -> Workload:
    """``w`` with the rollout the dry run's rollout phase runs (see the module docstring)."""
    new = cfg.rollout.max_new_tokens
    return replace(w, rollout_batch=cfg.rl.prompts_per_step * cfg.rollout.samples_per_prompt,
                   prompt_len=max(1, w.seq_len - new), response_len=new, kv_dtype=w.precision)


def planner_assumptions(a: Assumptions) -> Assumptions:
    """``a`` with the dry run's balanced routing and no framework overhead."""
    return replace(a, moe_imbalance=1.0, framework_overhead_gib=0.0)


def compare(b: MemoryBreakdown, report, rank: int) -> list:
    """The :class:`CategoryCheck` rows of one rank: planner breakdown ``b`` against a dry-run report."""
    fwd_bwd, opt_step = report.sections["train/fwd_bwd"], report.sections["train/opt_step"]
    build = report.phases["build"]
    measured = {
        "parameters": (b.parameters, build["parameters"]),
        "gradients": (b.gradients, opt_step["gradients"]),
        "optimizer states": (b.optimizer, build["optimizer_states"]),
        "activations": (b.activations + b.moe_dispatch + b.logits, fwd_bwd["activations"] + fwd_bwd["temporaries"]),
        "optimizer step": (b.optimizer_step, opt_step["temporaries"] + opt_step["activations"]),
        "train peak": (b.train_peak - b.overhead, report.phases["train"]["total"]),
    }
    if "rollout" in report.phases:
        measured["KV cache"] = (b.kv_cache, report.phases["rollout"]["kv_cache"])
    return [CategoryCheck(rank, name, float(p), float(d)) for name, (p, d) in measured.items()]


def check_against_dry_run(cfg: Config, layout: PlanLayout, w: Workload, a: Assumptions, ranks: tuple) -> list:
    """Run the dry run of each of ``ranks`` under ``layout`` and compare it with the planner's memory
    (``w`` cut by :func:`check_workload`)."""
    from megatron_seed.plan.dry_run import dry_run

    w = check_workload(layout, w, ranks)
    job = dry_run_config(cfg, layout, w)
    w, a = planner_workload(job, w), planner_assumptions(a)
    phases = ("train", "rollout") if layout.vpp == 1 else ("train",)  # the rollout engine runs one chunk per rank
    rows = []
    for rank in ranks:
        report = dry_run(job, layout.world, rank, phases)
        rows += compare(global_rank_memory(job.model, layout, w, a, rank), report, rank)
    return rows


def format_checks(rows: list, layout: PlanLayout, w: Workload) -> str:
    """A table of every row, then one line per disagreeing category saying what differs."""
    unit, size = ("GiB", 2**30) if max(r.dry_run for r in rows) >= 2**30 else ("MiB", 2**20)
    lines = [f"planner vs dry run, {layout.label()}, {layout.micro_batches(w)} micro-batches of {w.micro_batch} x {w.seq_len} "
             f"tokens: {unit} per category (agree within {TOLERANCE:.0%} of the larger)",
             f"{'rank':>5}  {'category':<17}{'planner':>9}{'dry run':>9}{'error':>8}  verdict"]
    for r in rows:
        lines.append(f"{r.rank:>5}  {r.category:<17}{r.planner / size:>9.2f}{r.dry_run / size:>9.2f}{r.relative_error:>+8.1%}  "
                     + ("agrees" if r.agrees else "DISAGREES"))
    bad = [r for r in rows if not r.agrees]
    for r in bad:
        lines.append(f"rank {r.rank} {r.category}: planner {r.planner / size:.2f} {unit} vs dry run {r.dry_run / size:.2f} {unit} "
                     f"({r.relative_error:+.1%}); {WHAT_DIFFERS[r.category]}")
    lines.append("all categories agree" if not bad else f"{len(bad)} of {len(rows)} disagree")
    return "\n".join(lines)
