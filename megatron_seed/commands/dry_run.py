"""``megatron-seed dry-run``: one rank of an N-rank job on tensors that hold no memory (see plan/dry_run.py).

The PPO phase (actor and critic steps on one rollout batch) is wired here, the layer that
may import ``rl/``: the dry run itself lives below it.
"""
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
                        help="what to run after the model build (default: all, in the order listed; ppo replaces the LM trainer)")


def ppo_phase(state) -> None:
    """One PPO step (behaviour log-probs and values, GAE, one actor and one critic update) on a rollout
    batch of ``rl.prompts_per_step x rollout.samples_per_prompt`` rows of ``train.seq_len`` tokens.
    The RL job holds an actor and a critic: the LM trainer of the earlier phases is dropped first."""
    import torch

    from megatron_seed.plan.dry_run import RUN_DEVICE
    from megatron_seed.train.trainer import Trainer
    from rl.ppo import PPOTrainer, rl_trainer_config

    cfg, ps = state.cfg, state.ps
    rows = cfg.rl.prompts_per_step * cfg.rollout.samples_per_prompt
    state.trainers = []
    actor = Trainer(rl_trainer_config(cfg, "actor", rows // cfg.rl.mini_batches), ps)
    critic = Trainer(rl_trainer_config(cfg, "critic", rows // cfg.rl.mini_batches), ps)
    state.trainers = [actor, critic]
    B, S = rows // ps.dp_size, cfg.train.seq_len

    def full(value, dtype, shape=(B, S)):
        return torch.full(shape, value, dtype=dtype, device=RUN_DEVICE)

    batch = {
        "input_ids_BS": full(0, torch.long), "labels_BS": full(0, torch.long),
        "position_ids_BS": torch.arange(S, device=RUN_DEVICE).expand(B, S).contiguous(),
        "padding_mask_BS": full(True, torch.bool), "mask_BS": full(True, torch.bool),
        "rewards_B": full(1.0, torch.float32, (B,)), "correct_B": full(True, torch.bool, (B,)),
        "truncated_B": full(False, torch.bool, (B,)),
    }
    PPOTrainer(actor, critic, cfg.rl).step(batch)


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import load_config
    from megatron_seed.plan.dry_run import DryRunError, dry_run

    cfg = load_config(args.preset, args.config, args.overrides, validate=True)
    phases = PHASE_CHOICES[:-1] if args.phase == "all" else (args.phase,)
    try:
        report = dry_run(cfg, args.world_size, args.rank, phases, extra_phases={"ppo": ppo_phase})
    except DryRunError as e:
        print(f"megatron-seed dry-run: rank {args.rank} of {args.world_size} fails: {e}", file=sys.stderr)
        return 1
    print(report.table())
    return 0
