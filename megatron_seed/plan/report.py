"""Text tables and JSON of planner results."""
from __future__ import annotations

import dataclasses

from megatron_seed.plan.hardware import GIB
from megatron_seed.plan.inputs import Assumptions, Cluster, Workload
from megatron_seed.plan.search import Evaluation, SearchResult

MEMORY_COLUMNS = ("parameters", "gradients", "optimizer", "activations", "moe_dispatch", "logits", "optimizer_step", "kv_cache",
                  "rollout_weights", "overhead")
MEMORY_HEADINGS = ("params", "grads", "optim", "acts", "dispatch", "logits", "opt_step", "kv", "rollout_w", "overhead")
TIME_COLUMNS = ("compute", "tp_comm", "ep_comm", "cp_comm", "pp_comm", "bubble", "dp_comm", "optimizer")


def assumption_lines(w: Workload, a: Assumptions) -> list:
    dp = "overlapped with the last micro-batch's backward" if w.overlap_grad_reduce else "exposed"
    return [
        f"compute: dense GEMMs at {a.gemm_efficiency:.0%} of peak, grouped expert GEMMs {a.expert_gemm_efficiency:.0%}, "
        f"attention core {a.attention_efficiency:.0%}; collectives at {a.comm_efficiency:.0%} of link bandwidth",
        f"overlap (at most the compute left to hide behind): tp collectives {a.overlap_tp:.0%}, ep all-to-all {a.overlap_ep:.0%}, "
        f"pp send/recv {a.overlap_pp:.0%}; dp gradient all-reduce {dp}; ZeRO-1 parameter all-gather {a.overlap_param_gather:.0%}; "
        "Adam exposed",
        "activations as kept by " + ("Megatron-core (fused norms and MoE unpermute, sequence shards re-gathered in backward)"
                                     if a.fused_norm and a.fused_moe and a.sharded_saved_input else
                                     "this stack (see megatron_seed/plan/memory.py)" if not (a.fused_norm or a.fused_moe or a.sharded_saved_input)
                                     else "a mix of both (--assume fused_norm / fused_moe / sharded_saved_input)"),
        "ep all-to-all: " + ("a token crosses to each remote node once (DeepEP-style)" if a.ep_node_dedup else
                             "every (token, expert) row to another node crosses the network (this stack's dispatcher)"),
        f"MoE: busiest expert rank gets {a.moe_imbalance:.2f}x the mean rows (compute, all-to-all, dispatch buffers); "
        f"framework overhead {a.framework_overhead_gib:.1f} GiB a GPU",
        f"precision {w.precision}: parameters and gradients {w.param_bytes} B, fp32 master, Adam moments and decay mask 16 B an element "
        f"({'ZeRO-1 over dp' if w.zero1 else 'not sharded'}); activations {w.act_bytes} B; recompute {w.recompute}; "
        "sequence parallel whenever tp > 1",
    ]


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def memory_table(e: Evaluation) -> list:
    stages = sorted({0, e.peak_stage, len(e.stages) - 1})
    header = f"    {'stage':>5} " + " ".join(f"{c:>8}" for c in MEMORY_HEADINGS) + f" {'peak':>7}  (GiB)"
    rows = [header]
    for r in stages:
        mem = e.stages[r]
        rows.append(f"    {r:>5} " + " ".join(f"{_gib(getattr(mem, c)):>8}" for c in MEMORY_COLUMNS)
                    + f" {_gib(mem.peak):>7}  ({mem.in_flight} chunk forwards in flight)")
    return rows


def time_line(e: Evaluation) -> str:
    t = e.time
    parts = ", ".join(f"{c} {getattr(t, c):.3f}" for c in TIME_COLUMNS if getattr(t, c) > 0)
    return f"    step {t.step:.3f} s = {parts} (slowest stage {t.slowest_stage})"


def summary_row(i: int, e: Evaluation) -> str:
    t = e.time
    return (f"{i:>4}  {e.layout.label():<36} {_gib(e.peak):>8} {t.step:>8.3f} {t.tokens_per_s_per_gpu:>10.0f} "
            f"{t.mfu:>6.1%} {t.bubble / t.step:>7.1%}")


SUMMARY_HEADER = f"{'rank':>4}  {'layout':<36} {'peak GiB':>8} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6} {'bubble':>7}"


def format_search(result: SearchResult, header: list, w: Workload, a: Assumptions, show: int, detail: int) -> str:
    lines = list(header) + [f"  {line}" for line in assumption_lines(w, a)]
    lines.append(f"{result.considered} valid layouts, {len(result.ranked)} fit, {len(result.dropped)} do not")
    if result.ranked:
        lines += ["", SUMMARY_HEADER] + [summary_row(i + 1, e) for i, e in enumerate(result.ranked[:show])]
        for i, e in enumerate(result.ranked[:detail]):
            lines += ["", f"#{i + 1} {e.layout.label()}: memory per GPU by pipeline stage (worst ZeRO rank)"]
            lines += memory_table(e) + [time_line(e)]
    else:
        lines.append("no layout fits: raise --gpus, lower --micro-batch / --seq-len, or use --recompute selective|full")
    if result.dropped:
        lines += ["", "fastest layouts that do not fit:"]
        lines += [f"  {e.layout.label()}: {e.why_not()}" for e in result.dropped[:min(show, 5)]]
    return "\n".join(lines)


def format_evaluation(e: Evaluation, header: list, w: Workload, a: Assumptions) -> str:
    lines = list(header) + [f"  {line}" for line in assumption_lines(w, a)]
    verdict = "fits" if e.fits else f"does NOT fit: {e.why_not()}"
    lines += ["", SUMMARY_HEADER, summary_row(1, e), "", f"{e.layout.label()} {verdict}"]
    return "\n".join(lines + memory_table(e) + [time_line(e)])


def evaluation_json(e: Evaluation) -> dict:
    return {
        "layout": dataclasses.asdict(e.layout),
        "label": e.layout.label(),
        "fits": e.fits,
        "why_not": e.why_not(),
        "peak_bytes": e.peak,
        "peak_stage": e.peak_stage,
        "memory_by_stage": [s.as_dict() for s in e.stages],
        "time": e.time.as_dict(),
    }


def inputs_json(c: Cluster, w: Workload, a: Assumptions) -> dict:
    return {"gpu": dataclasses.asdict(c.gpu), "gpus": c.gpus, "gpus_per_node": c.gpus_per_node,
            "workload": dataclasses.asdict(w), "assumptions": dataclasses.asdict(a)}
