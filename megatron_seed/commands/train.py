"""``megatron-seed train``: pretraining on indexed datasets, one process or torchrun."""
from __future__ import annotations

import argparse

from megatron_seed.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in train.save_dir (weights, optimizer, step, data position); "
                             "starts fresh when there is none")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import load_config

    cfg = load_config(args.preset, args.config, args.overrides)
    if args.no_progress:
        cfg.train.progress = False
    return pretrain(cfg, resume=args.resume)


def pretrain(cfg, resume: bool = False) -> int:
    """Build groups, model, data and trainer from ``cfg``; train; save. Returns an exit code."""
    import os
    import sys

    from data.pretrain import batch_iterator, build_pretrain_dataset
    from megatron_seed.parallel.state import rank_map
    from megatron_seed.train.checkpoint import latest_checkpoint
    from megatron_seed.train.metrics import MetricsLogger
    from megatron_seed.train.run_setup import load_run_tokenizer, start_run
    from megatron_seed.train.trainer import NonFiniteLossError, Trainer

    ps = start_run(cfg)
    if ps.rank == 0 and ps.layout.world > 1:
        print(rank_map(ps.layout), flush=True)
    tokenizer = load_run_tokenizer(cfg)
    trainer = Trainer(cfg, ps)
    if resume and latest_checkpoint(cfg.train.save_dir) is not None:
        trainer.load(cfg.train.save_dir)
    elif cfg.train.load_dir:
        trainer.load(cfg.train.load_dir)
    # size the shuffled epochs to the whole run so no order repeats within it
    num_samples = cfg.train.steps * cfg.train.global_batch_size
    dataset = build_pretrain_dataset(cfg.data.train_data, cfg.data.weights, cfg.train.seq_len, cfg.train.seed, tokenizer, num_samples=num_samples)
    batches = batch_iterator(dataset, trainer.local_batch_size, ps.dp_rank, ps.dp_size, trainer.consumed_samples)
    logger = MetricsLogger(os.path.join(cfg.train.save_dir, "metrics.jsonl"), enabled=trainer.is_logging_rank)
    try:
        trainer.fit(batches, logger, progress=cfg.train.progress and sys.stderr.isatty())
    except NonFiniteLossError as e:
        print(f"megatron-seed train: {e}", file=sys.stderr)
        return 3
    finally:
        logger.close()
    path = trainer.save()
    if trainer.is_logging_rank:
        print(f"saved {path}")
    return 0
