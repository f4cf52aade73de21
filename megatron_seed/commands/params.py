"""``megatron-seed params``: total and activated parameters, with the breakdown."""
from __future__ import annotations

import argparse

from megatron_seed.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import load_config
    from megatron_seed.params import count_parameters, format_count

    cfg = load_config(args.preset, args.config, args.overrides, validate=True)
    counts = count_parameters(cfg.model)
    name = args.preset or args.config or "default"
    print(f"{name}: total {format_count(counts.total)} ({counts.total:,}), activated per token {format_count(counts.activated)} ({counts.activated:,})")
    for part, n in counts.breakdown().items():
        share = 100.0 * n / counts.total if counts.total else 0.0
        print(f"  {part:<15} {format_count(n):>9} {share:6.2f}%")
    print(f"  {'(activated experts)':<15} {format_count(counts.activated_experts):>9}")
    return 0
