"""``megatron-seed train-rm``: train a pairwise reward model on a JSONL of preference pairs.

Each line is ``{"prompt": ..., "chosen": ..., "rejected": ...}``. The model is the
configured GPT-MoE (``--preset`` / ``--config`` / ``--set``) with ``model.value_head``
switched on; a held-out share of the pairs reports loss and accuracy.
"""
from __future__ import annotations

import argparse

from megatron_seed.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected}")
    parser.add_argument("--tokenizer", default=None,
                        help="'bytes' (UTF-8 bytes), 'bundled', a .model file or a HF dir (default: data.tokenizer)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of pairs held out for evaluation")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="where to write the trained model (torch .pt)")


def run(args: argparse.Namespace) -> int:
    import random

    from megatron_seed.config import ConfigError, load_config
    from rl.rewards.pairwise_rm import (ByteEncoder, RewardModel, RMTrainConfig, load_pairs, save_reward_model,
                                        train_reward_model)

    if not 0 <= args.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction: expected a share in [0, 1), got {args.eval_fraction}")
    cfg = load_config(args.preset, args.config, args.overrides + ["model.value_head=true"], validate=True)
    spec = args.tokenizer or cfg.data.tokenizer
    if spec == "bytes":
        encoder = ByteEncoder()
    else:
        from data.tokenizer import load_tokenizer

        encoder = load_tokenizer(spec)
    try:
        pairs = load_pairs(args.data)
        model = RewardModel(cfg.model, encoder, seed=args.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    random.Random(args.seed).shuffle(pairs)
    n_eval = int(len(pairs) * args.eval_fraction)
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    print(f"train-rm: {len(train_pairs)} training pairs, {len(eval_pairs)} held out; tokenizer {spec}")

    def log(record: dict) -> None:
        extra = (f"  eval loss {record['eval_loss']:.4f}  eval acc {record['eval_accuracy']:.3f}"
                 if "eval_loss" in record else "")
        print(f"step {record['step']:5d}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f}{extra}", flush=True)

    train_cfg = RMTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              eval_every=args.eval_every)
    train_reward_model(model, train_pairs, train_cfg, eval_pairs or None, log)
    if args.save:
        save_reward_model(model, args.save)
        print(f"train-rm: saved to {args.save}")
    return 0
