"""GAE at long responses: ``rl.advantage.gae`` (recursive-doubling scan) vs the per-position loop.

The reference is the loop ``gae`` ran before (one vectorised-over-B step per position,
``S`` Python iterations) on the same deltas and decays. Both run on the same random
batch in float64; the script prints both times, the ratio and the relative difference.
Usage: ``python benchmarks/bench_gae.py [--batch 16 --seq 32768 --repeats 3]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rl.advantage import gae  # noqa: E402


def loop_gae(rewards_BS: torch.Tensor, values_BS: torch.Tensor, mask_BS: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE by the reverse loop over positions (episode ends after the last response token)."""
    B, S = mask_BS.shape
    f64 = torch.float64
    rewards = torch.where(mask_BS, rewards_BS.to(f64), 0.0)
    values = torch.where(mask_BS, values_BS.to(f64), 0.0)
    advantages = torch.zeros(B, S, dtype=f64)
    carry_B = torch.zeros(B, dtype=f64)
    next_value_B = torch.zeros(B, dtype=f64)
    for t in range(S - 1, -1, -1):
        m_B = mask_BS[:, t]
        delta_B = rewards[:, t] + gamma * next_value_B - values[:, t]
        carry_B = torch.where(m_B, delta_B + gamma * lam * carry_B, carry_B)
        next_value_B = torch.where(m_B, values[:, t], next_value_B)
        advantages[:, t] = carry_B
    return torch.where(mask_BS, advantages, 0.0)


def best_time(fn, repeats: int) -> tuple:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    args = parser.parse_args()
    B, S = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    # a prompt of 0..1023 tokens, then a response to a random length (one row fills the batch)
    mask_BS = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, 1024, (1,), generator=g))
        end = S if b == 0 else int(torch.randint(start + 1, S + 1, (1,), generator=g))
        mask_BS[b, start:end] = True
    values_BS = torch.randn(B, S, dtype=torch.float64, generator=g)
    rewards_BS = torch.zeros(B, S, dtype=torch.float64)
    last_B = torch.where(mask_BS, torch.arange(S), -1).amax(1)
    rewards_BS[torch.arange(B), last_B] = torch.randn(B, dtype=torch.float64, generator=g)

    t_ours, ours = best_time(lambda: gae(rewards_BS, values_BS, mask_BS, args.gamma, args.lam), args.repeats)
    t_loop, ref = best_time(lambda: loop_gae(rewards_BS, values_BS, mask_BS, args.gamma, args.lam), args.repeats)
    rel = float((ours - ref).norm() / ref.norm())
    print(f"GAE B={B} S={S} float64, best of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"  reference loop : {t_loop * 1e3:9.1f} ms")
    print(f"  ours (scan)    : {t_ours * 1e3:9.1f} ms")
    print(f"  ratio loop/ours: {t_loop / t_ours:9.1f}x   relative difference {rel:.2e}")
    return 0 if rel < 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
