"""``megatron-seed plan``: which layout, on how many GPUs, at what speed (memory + time model).

Without ``--layout`` it searches every valid layout for ``--gpus`` GPUs, drops those that do
not fit (saying why) and ranks the rest by estimated throughput; with ``--layout`` it
evaluates that one. ``--check-dry-run`` then runs the dry run of the first and the last rank of
that layout (or of the best one found) and compares the planner's memory with it category by
category (:mod:`megatron_seed.plan.executed`). See :mod:`megatron_seed.plan` for the model and
its assumptions.
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_seed.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--gpu", default="h100", help="GPU name from the GPU table (h100, h200, b200)")
    parser.add_argument("--gpu-table", default=None, help="YAML GPU table replacing megatron_seed/plan/gpus.yaml")
    parser.add_argument("--gpus", type=int, required=True, help="total GPU count")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--layout", default=None, help="evaluate one layout, e.g. tp=2,pp=8,vpp=4,ep=32 (dp derived)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: train.seq_len)")
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: train.global_batch_size)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (default: train.micro_batch_size)")
    parser.add_argument("--precision", default="bf16", help="bf16 | fp8 | fp32")
    parser.add_argument("--recompute", default="none", help="none | selective | full")
    parser.add_argument("--no-zero1", dest="zero1", action="store_false", help="replicate optimizer state over dp")
    parser.add_argument("--rollout-batch", type=int, default=0, help="RL: sequences generated per step by the whole job")
    parser.add_argument("--prompt-len", type=int, default=0, help="RL: prompt tokens per rollout sequence")
    parser.add_argument("--response-len", type=int, default=None, help="RL: response tokens (default: rollout.max_new_tokens)")
    parser.add_argument("--kv-dtype", default=None, help="RL: the rollout's dtype (rollout.dtype; its KV cache's), bf16 | fp8 | fp32; "
                        "default: the parameters' (--precision fp32: fp32, else bf16), as rollout.dtype=auto samples; another "
                        "adds a copy of the parameters at it")
    parser.add_argument("--stack", default="ours", help="assumption profile: ours (this stack today) | megatron-core (its overlaps and DeepEP)")
    parser.add_argument("--assume", action="append", default=[], metavar="NAME=VALUE",
                        help="change an assumption, e.g. --assume overlap_ep=0.9 (repeatable; see the printed list)")
    parser.add_argument("--max-cp", type=int, default=1, help="largest context-parallel size the search tries")
    parser.add_argument("--max-vpp", type=int, default=8, help="largest virtual-pipeline size the search tries")
    parser.add_argument("--show", type=int, default=10, help="ranked layouts listed")
    parser.add_argument("--detail", type=int, default=3, help="best layouts shown with their memory breakdown")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--check-dry-run", action="store_true",
                        help="compare the memory of the layout (or the best one) with the dry run of its first and last rank")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import ConfigError, load_config
    from megatron_seed.params import count_parameters, format_count
    from megatron_seed.plan.hardware import get_gpu
    from megatron_seed.plan.inputs import Assumptions, Cluster, Workload, check_workload
    from megatron_seed.plan.layout import parse_layout
    from megatron_seed.plan.report import evaluation_json, format_evaluation, format_search, inputs_json
    from megatron_seed.plan.search import evaluate, search

    cfg = load_config(args.preset, args.config, args.overrides, validate=False)
    m, t = cfg.model, cfg.train
    cluster = Cluster(get_gpu(args.gpu, args.gpu_table), args.gpus, args.gpus_per_node)
    workload = Workload(
        seq_len=args.seq_len or t.seq_len, global_batch=args.global_batch or t.global_batch_size,
        micro_batch=args.micro_batch or t.micro_batch_size, precision=args.precision, recompute=args.recompute,
        zero1=args.zero1, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce, rollout_batch=args.rollout_batch,
        prompt_len=args.prompt_len, response_len=cfg.rollout.max_new_tokens if args.response_len is None else args.response_len,
        kv_dtype=args.kv_dtype or ("fp32" if args.precision == "fp32" else "bf16"),
    )
    check_workload(workload, cluster, m.max_seq_len)
    if args.check_dry_run and args.stack != "ours":
        raise ConfigError(f"--check-dry-run with --stack {args.stack}: the dry run executes this stack; fix: --stack ours")
    if args.check_dry_run and args.json:
        raise ConfigError("--check-dry-run prints a table; fix: drop --json")
    assumptions = Assumptions.profile(args.stack).replace(args.assume)
    counts = count_parameters(m)
    name = args.preset or args.config or "default config"
    header = [
        f"plan: {name} ({format_count(counts.total)} total, {format_count(counts.activated)} activated) on {cluster.gpus} x "
        f"{cluster.gpu.description} ({cluster.gpu.memory_gib:.1f} GiB, {cluster.gpus_per_node} a node)",
        f"  step: {workload.global_batch} sequences x {workload.seq_len} tokens, micro-batch {workload.micro_batch}"
        + (f"; rollout {workload.rollout_batch} x ({workload.prompt_len} + {workload.response_len}) tokens, KV {workload.kv_dtype}"
           if workload.rollout_batch else ""),
    ]
    if args.layout:
        evaluation = evaluate(m, parse_layout(args.layout, cluster.gpus), workload, cluster, assumptions)
        if args.json:
            print(json.dumps({"inputs": inputs_json(cluster, workload, assumptions), "evaluation": evaluation_json(evaluation)}, indent=1))
        else:
            print(format_evaluation(evaluation, header, workload, assumptions))
        return check_dry_run(cfg, evaluation.layout, workload, assumptions) if args.check_dry_run else 0
    result = search(m, workload, cluster, assumptions, max_vpp=args.max_vpp, max_cp=args.max_cp)
    if args.json:
        print(json.dumps({
            "inputs": inputs_json(cluster, workload, assumptions), "considered": result.considered,
            "ranked": [evaluation_json(e) for e in result.ranked[:args.show]],
            "dropped": [evaluation_json(e) for e in result.dropped[:args.show]],
        }, indent=1))
    else:
        print(format_search(result, header, workload, assumptions, args.show, args.detail))
    if not result.ranked:
        return 1
    return check_dry_run(cfg, result.ranked[0].layout, workload, assumptions) if args.check_dry_run else 0


def check_dry_run(cfg, layout, workload, assumptions) -> int:
    """Print the planner-vs-dry-run table of ``layout``'s first and last rank; 1 if a category disagrees."""
    from megatron_seed.plan.dry_run import DryRunError
    from megatron_seed.plan.executed import check_against_dry_run, check_workload, format_checks

    ranks = (0, layout.world - 1)
    try:
        rows = check_against_dry_run(cfg, layout, workload, assumptions, ranks)
    except DryRunError as e:
        print(f"megatron-seed plan --check-dry-run: the dry run of {layout.label()} fails: {e}", file=sys.stderr)
        return 1
    print(format_checks(rows, layout, check_workload(layout, workload, ranks)))
    return 0 if all(r.agrees for r in rows) else 1
