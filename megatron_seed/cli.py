"""``megatron-seed`` command line: the one place that wires every layer together.

Each subcommand lives in a module exposing ``add_arguments(parser)`` and
``run(args) -> int``; :data:`COMMANDS` maps the subcommand name to that module,
imported only when the subcommand is used (so ``params`` never imports the trainer).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from megatron_seed.config import ConfigError
from megatron_seed.host_allocator import keep_freed_memory_in_heap

COMMANDS = {
    "params": ("megatron_seed.commands.params", "exact parameter counts of a preset or config"),
    "train": ("megatron_seed.commands.train", "pretrain / fine-tune a GPT-MoE (torchrun for several processes)"),
    "demo": ("megatron_seed.commands.demo", "the embedded default: a short run of the tiny preset on the bundled corpus"),
    "convert": ("megatron_seed.commands.convert", "convert checkpoints to / from Hugging Face (Qwen3-MoE, GLM-4.5-MoE) and megatron-core"),
    "train-rm": ("megatron_seed.commands.train_rm", "train a pairwise reward model on JSONL preference pairs"),
    "preprocess": ("megatron_seed.commands.preprocess", "tokenize JSONL into a Megatron .bin/.idx indexed dataset (parallel, streaming)"),
    "filter": ("megatron_seed.commands.filter", "drop RL prompts that are too easy / too hard / low-variance under a policy's samples"),
    "plan": ("megatron_seed.commands.plan", "memory and step-time model: rank the layouts that fit a model on N GPUs"),
    "sft": ("megatron_seed.commands.sft", "supervised fine-tuning on chat conversations (default: generated worked solutions)"),
    "rl": ("megatron_seed.commands.rl", "Seed1.5-Thinking RL: value pretraining then PPO with adaptive domain weights (tiny default)"),
    "dry-run": ("megatron_seed.commands.dry_run", "run one rank of an N-rank job on memory-free tensors: device, shape and collective checks, peak memory"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset / --config / --set, shared by every command that builds a Config."""
    parser.add_argument("--preset", default=None, help="preset name from configs/ (tiny, small, seed-200b-a20b)")
    parser.add_argument("--config", default=None, help="YAML config file (applied after the preset)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one field, e.g. --set model.num_layers=4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-seed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory_in_heap()  # CPU steps stop page-faulting: see megatron_seed/host_allocator.py
    try:
        return importlib.import_module(args._module).run(args) or 0
    except ConfigError as e:
        print(f"megatron-seed {args.command}: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
