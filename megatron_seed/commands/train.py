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

    import torch

    from data.pretrain import batch_iterator, build_pretrain_dataset
    from data.tokenizer import load_tokenizer
    from megatron_seed.parallel.state import ParallelState, init_distributed, rank_map
    from megatron_seed.train.checkpoint import latest_checkpoint
    from megatron_seed.train.metrics import MetricsLogger
    from megatron_seed.train.trainer import NonFiniteLossError, Trainer

    rank, world = init_distributed(cfg.parallel.backend)
    ps = ParallelState.build(cfg.parallel, world, rank)
    if rank == 0 and world > 1:
        print(rank_map(ps.layout), flush=True)
    if not torch.cuda.is_available() and world == 1:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        from megatron_seed.config import ConfigError

        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; fix: raise model.vocab_size")
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
