"""``megatron-seed dry-run``: one rank of an N-rank job on tensors that hold no memory (see plan/dry_run.py);
the PPO phase comes from ``rl/dry_run.py`` (the dry run itself lives below ``rl/``)."""
from __future__ import annotations

import argparse
import sys

from megatron_seed.cli import add_config_arguments

PHASE_CHOICES = ("train", "rollout", "checkpoint", "ppo", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, required=True, help="ranks of the job being checked")
    parser.add_argument("--rank", type=int, default=0, help="the rank to run (0 = first pipeline stage; world-1 = last)")
    parser.add_argument("--phase", choices=PHASE_CHOICES, default="all",
                        help="what to run after the model build (default: all, in this order; ppo replaces the LM "
                             "trainer by the actor and critic)")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import load_config
    from megatron_seed.plan.dry_run import DryRunError, dry_run
    from rl.dry_run import PHASES as RL_PHASES

    cfg = load_config(args.preset, args.config, args.overrides, validate=True)
    phases = PHASE_CHOICES[:-1] if args.phase == "all" else (args.phase,)
    try:
        report = dry_run(cfg, args.world_size, args.rank, phases, extra_phases=RL_PHASES)
    except DryRunError as e:
        print(f"megatron-seed dry-run: rank {args.rank} of {args.world_size} fails: {e}", file=sys.stderr)
        return 1
    print(report.table())
    return 0
