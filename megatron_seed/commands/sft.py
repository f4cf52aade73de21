"""``megatron-seed sft``: supervised fine-tuning on chat conversations (one process or torchrun).

Trains on ``sft.data`` (``--data``, a ``{"messages": [...]}`` JSONL file) or, without
one, on generated worked solutions of ``data.task_families`` (see
:mod:`megatron_seed.train.sft`); starts from ``train.load_dir`` when given (e.g. a
pretraining checkpoint), else from a fresh model; saves to ``train.save_dir``. The
result is what ``megatron-seed rl --set train.load_dir=<save_dir>/iter_...`` starts from.
"""
from __future__ import annotations

import argparse

from megatron_seed.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", default=None, help="conversations JSONL (default: sft.data, else generated worked solutions)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import load_config

    overrides = list(args.overrides) + ([f"sft.data={args.data}"] if args.data else [])
    cfg = load_config(args.preset or (None if args.config else "tiny"), args.config, overrides)
    if args.no_progress:
        cfg.train.progress = False
    return sft_main(cfg)


def sft_main(cfg) -> int:
    """Build groups, data and the SFT trainer from ``cfg``; train; save. Returns an exit code."""
    import os
    import sys

    from megatron_seed.config import ConfigError
    from megatron_seed.train import checkpoint
    from megatron_seed.train.metrics import MetricsLogger
    from megatron_seed.train.run_setup import load_run_tokenizer, start_run
    from megatron_seed.train.sft import SFT, sft_conversations
    from megatron_seed.train.trainer import NonFiniteLossError

    if cfg.sft.steps < 1:
        raise ConfigError(f"sft.steps={cfg.sft.steps}: megatron-seed sft needs at least one step; fix: --set sft.steps=200")
    if cfg.sft.stop_accuracy is not None:
        raise ConfigError(f"sft.stop_accuracy={cfg.sft.stop_accuracy}: only the RL run's SFT phase (megatron-seed rl) evaluates "
                          "while it trains; megatron-seed sft runs all sft.steps: drop the setting")
    ps = start_run(cfg)
    tokenizer = load_run_tokenizer(cfg)
    sft = SFT(cfg, ps, tokenizer, sft_conversations(cfg))
    if cfg.train.load_dir:  # weights only: the SFT optimizer and schedule start fresh
        checkpoint.load_model_weights(sft.trainer.chunks, ps, cfg.train.load_dir)
        sft.trainer.optimizer.sync_master_from_params()
    logger = MetricsLogger(os.path.join(cfg.train.save_dir, "metrics.jsonl"), enabled=sft.trainer.is_logging_rank)
    try:
        sft.run(logger, progress=cfg.train.progress and sys.stderr.isatty())
    except NonFiniteLossError as e:
        print(f"megatron-seed sft: {e}", file=sys.stderr)
        return 3
    finally:
        logger.close()
    path = sft.trainer.save()
    if sft.trainer.is_logging_rank:
        print(f"saved {path}")
    return 0
