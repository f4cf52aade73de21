"""One PPO step on a skewed rollout batch, rows padded to the longest vs packed (``train.max_tokens_per_micro_batch``).

The batch Seed's long chain-of-thought produces: one response of ``--long`` tokens and
``--rows - 1`` of ``--short`` (prompts of 16 tokens). Both runs take the same PPO step
(actor and critic, one epoch, one mini-batch; the results agree, see tests/test_packing.py)
in one process, side by side; printed: the token slots each run computes (rows x width
over every micro-batch of every pass), the wall time of the step and the padded / packed
ratios.
Usage: ``python benchmarks/bench_packing.py [--rows 16 --long 1024 --short 64 --hidden 64]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_seed.config import Config, MoEConfig, ModelConfig, RLConfig, TrainConfig  # noqa: E402
from megatron_seed.parallel.state import ParallelState  # noqa: E402
from megatron_seed.train.trainer import Trainer  # noqa: E402
from rl.experience import from_sequences  # noqa: E402
from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config  # noqa: E402

PROMPT = 16


def bench_config(args, max_tokens) -> Config:
    model = ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=2, num_attention_heads=8, num_kv_heads=2,
                        head_dim=args.hidden // 8, max_seq_len=PROMPT + args.long + 1,
                        moe=MoEConfig(num_experts=4, top_k=2, ffn_size=args.hidden, num_shared_experts=1, shared_ffn_size=args.hidden))
    train = TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.rows, seq_len=PROMPT + args.long,
                        progress=False, max_tokens_per_micro_batch=max_tokens)
    return Config(model=model, train=train, rl=RLConfig(ppo_epochs=1, mini_batches=1, kl_coef=0.0))


def rollouts(args) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = [args.long] + [args.short] * (args.rows - 1)
    return from_sequences([torch.randint(1, 256, (PROMPT,), generator=g).tolist() for _ in lengths],
                          [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths],
                          [float(i % 2) for i in range(args.rows)])


def run(args, max_tokens) -> tuple:
    cfg = bench_config(args, max_tokens)
    ps = ParallelState.single()
    actor = Trainer(rl_trainer_config(cfg, "actor", args.rows), ps)
    critic = Trainer(rl_trainer_config(cfg, "critic", args.rows), ps)
    init_critic_from_actor(critic, actor)
    ppo = PPOTrainer(actor, critic, cfg.rl)
    batch = rollouts(args)
    start = time.perf_counter()
    metrics = ppo.step(batch)
    seconds = time.perf_counter() - start
    if ppo.layout is None:
        slots = batch["input_ids_BS"].numel()
    else:
        slots = len(ppo.layout.micro_batches) * ppo.layout.width
    return seconds, slots, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--long", type=int, default=1024)
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per padded micro-batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    budget = PROMPT + args.long + 1
    padded_s, padded_slots, padded = run(args, None)
    packed_s, packed_slots, packed = run(args, budget)
    print(f"rows={args.rows} long={args.long} short={args.short} prompt={PROMPT} hidden={args.hidden} budget={budget}")
    print(f"padded: {padded_slots} token slots per pass, step {padded_s:.2f} s, critic/value_loss {padded['critic/value_loss']:.6f}")
    print(f"packed: {packed_slots} token slots per pass, step {packed_s:.2f} s, critic/value_loss {packed['critic/value_loss']:.6f}, "
          f"fill {packed['packing/fill']:.3f}")
    print(f"padded / packed: token slots {padded_slots / packed_slots:.2f}x, step time {padded_s / packed_s:.2f}x")


if __name__ == "__main__":
    main()
