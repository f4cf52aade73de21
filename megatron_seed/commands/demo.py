"""``megatron-seed demo``: the embedded default, no GPU and no downloads.

A short pretraining run of the ``tiny`` preset on the bundled corpus; prints the
loss every few steps and the relative drop at the end.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--save-dir", default="runs/demo")


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import shutil

    from megatron_seed.commands.train import pretrain
    from megatron_seed.config import load_config

    overrides = [f"train.save_dir={args.save_dir}"] + ([f"train.steps={args.steps}"] if args.steps else [])
    cfg = load_config("tiny", overrides=overrides)
    shutil.rmtree(args.save_dir, ignore_errors=True)
    code = pretrain(cfg)
    if code:
        return code
    with open(os.path.join(args.save_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    drop = 1.0 - losses[-1] / losses[0]
    print(f"demo: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({100 * drop:.0f}% lower than the first logged value)")
    return 0
