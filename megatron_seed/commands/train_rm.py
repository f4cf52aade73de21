"""``megatron-seed train-rm``: train a pairwise reward model on a JSONL of preference pairs.

Each line is ``{"prompt": ..., "chosen": ..., "rejected": ...}``. The model is the
configured GPT-MoE (``--preset`` / ``--config`` / ``--set``) with ``model.value_head``
switched on, trained by the shared :class:`~megatron_seed.train.trainer.Trainer` (one process
or torchrun under any ``parallel.*`` layout; optimizer and schedule from ``train.*``,
``--steps`` / ``--lr`` / ``--batch-size`` override them); a held-out share of the pairs
reports loss and accuracy.
"""
from __future__ import annotations

import argparse

from megatron_seed.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected}")
    parser.add_argument("--tokenizer", default=None,
                        help="'bytes' (UTF-8 bytes), 'bundled', a .model file or a HF dir (default: data.tokenizer)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (train.steps)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step, over all dp ranks")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (train.lr; decays to train.min_lr)")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of pairs held out for evaluation")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="where to write the trained model (torch .pt)")


def run(args: argparse.Namespace) -> int:
    import random

    from megatron_seed.config import ConfigError, load_config
    from megatron_seed.parallel.sharding import full_state_dict
    from megatron_seed.parallel.state import ParallelState, init_distributed
    from megatron_seed.train.trainer import Trainer
    from rl.rewards.pairwise_rm import (ByteEncoder, RewardModel, load_pairs, rm_trainer_config, save_reward_model,
                                        train_reward_model)

    if not 0 <= args.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction: expected a share in [0, 1), got {args.eval_fraction}")
    overrides = [f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.seed={args.seed}"]
    cfg = load_config(args.preset, args.config, overrides + args.overrides + ["model.value_head=true"], validate=True)
    cfg = rm_trainer_config(cfg, args.batch_size)
    spec = args.tokenizer or cfg.data.tokenizer
    if spec == "bytes":
        encoder = ByteEncoder()
    else:
        from data.tokenizer import load_tokenizer

        encoder = load_tokenizer(spec)
    rank, world = init_distributed(cfg.parallel.backend)
    ps = ParallelState.build(cfg.parallel, world, rank)
    trainer = Trainer(cfg, ps)
    try:
        pairs = load_pairs(args.data)
        model = RewardModel(cfg.model, encoder, gpt=trainer.chunks[0])  # tokenizes; scores when pp = 1
    except ValueError as e:
        raise ConfigError(str(e)) from None
    random.Random(args.seed).shuffle(pairs)
    n_eval = int(len(pairs) * args.eval_fraction)
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    if trainer.is_logging_rank:
        print(f"train-rm: {len(train_pairs)} training pairs, {len(eval_pairs)} held out; tokenizer {spec}")

    def log(record: dict) -> None:
        extra = (f"  eval loss {record['eval_loss']:.4f}  eval acc {record['eval_accuracy']:.3f}"
                 if "eval_loss" in record else "")
        print(f"step {record['step']:5d}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f}{extra}", flush=True)

    train_reward_model(trainer, model, train_pairs, args.seed, eval_pairs or None, args.eval_every, log)
    if args.save:
        weights = full_state_dict(trainer.chunks, ps)  # collective; the whole model on rank 0
        if weights is not None:
            save_reward_model(cfg.model, weights, args.save)
            print(f"train-rm: saved to {args.save}")
    return 0
