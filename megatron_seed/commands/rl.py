"""``megatron-seed rl``: the Seed1.5-Thinking RL recipe (one process or torchrun / SLURM).

Builds :class:`rl.rl_trainer.RLTrainer` from the config (``--preset rl-tiny`` by default:
``configs/rl-tiny.yaml``) and runs its phases: SFT of the policy on worked solutions
(``sft.steps``), value pretraining of the critic, then PPO with held-out evaluations. Prompts: a JSONL file (``--prompts`` or ``data.prompts``) or
generated verifiable tasks (``data.num_tasks``). ``--resume`` continues from the checkpoints in
``train.save_dir``; Ctrl-C saves and stops.
"""
from __future__ import annotations

import argparse

from megatron_seed.cli import add_config_arguments

DEFAULT_PRESET = "rl-tiny"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--prompts", default=None, help="RL prompt JSONL (default: data.prompts, else generated tasks)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in train.save_dir")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import load_config
    from rl.rl_trainer import RLTrainer

    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    cfg = load_config(preset, args.config, list(args.overrides))
    trainer = RLTrainer.from_config(cfg, args.prompts)
    if args.resume and trainer.resume() and trainer.logging:
        print(f"resumed from {cfg.train.save_dir}", flush=True)
    result = trainer.fit()
    return 130 if result["stopped"] else 0
