"""Rollout / training mismatch on the tiny preset: route disagreement and log-prob differences (issue 19).

For each rollout setting the in-process engine samples ``--prompts`` random prompts (one
sample each, temperature 1) with the weights of one freshly initialised ``tiny`` model, and
the PPO trainer's first forward of that batch (training's micro-batches, eager fp32) is
compared with what the rollout reported, through the real ``PPOTrainer.prepare``
(:mod:`rl.mismatch`): the share of response tokens whose top-k expert set the training
router picks differently from the rollout (mean over MoE layers), and ``|logp_train -
logp_rollout|`` per response token (mean, max, share above 1e-3) and the spread of the
sequence log-ratio. Each rollout is measured with ``rl.routing_replay`` off and on (the
same rollout both times): with replay the training forward uses the recorded experts, so
the expert sets it uses never differ; the route column still shows the router's own choice.

Settings: eager fp32 at rollout batch 16 (all prompts in one batch) and batch 1 (a KV-cache
budget of one sequence, so each prompt is prefilled and decoded alone; training still gets
the same 16-row batch), ``rollout.compile=true`` at batch 16, and a bf16 rollout
(``rollout.dtype=bf16``).

    .venv/bin/python benchmarks/bench_rl_mismatch.py [--prompts 16] [--new-tokens 32] [--seed 0] [--threads 1]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from megatron_seed.config import RolloutConfig, load_config
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer
from rl.experience import from_rollout
from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config
from rl.rollout.engine import RolloutEngine, kv_bytes_per_slot
from rl.rollout.sampling import SamplingParams

COLUMNS = ("mismatch/route_diff_mean", "mismatch/logp_abs_diff_mean", "mismatch/logp_abs_diff_max", "mismatch/logp_frac_above_1e-3",
           "mismatch/seq_log_ratio_std")


SETTINGS = (  # (name, rollout config changes, one row per chunk)
    ("eager fp32, batch 16", {}, False),
    ("eager fp32, batch 1", {}, True),
    ("compile=true, batch 16", {"compile": True}, False),
    ("bf16 rollout, batch 16", {"dtype": "bf16"}, False),
)


def rollout(actor: Trainer, changes: dict, one_row: bool, prompts: list, new_tokens: int, seed: int):
    """One ``generate`` call; ``one_row``: a KV-cache budget that holds one sequence, so every chunk (prefill and decode
    steps) has batch 1 while the batch handed to training is the same 16 rows."""
    if one_row:
        longest = max(len(p) for p in prompts) + new_tokens
        changes = dict(changes, kv_cache_budget_mb=1.5 * kv_bytes_per_slot(actor.chunks[0]) * longest / 2**20)
    engine = RolloutEngine(actor.chunks, actor.ps, RolloutConfig(**changes), stop_ids=[], pad_id=0, seed=seed)
    return engine.generate(prompts, n=1, sampling=SamplingParams(temperature=1.0), max_new_tokens=new_tokens)


def measure(actor: Trainer, critic: Trainer, cfg, batch: dict, replay: str) -> dict:
    """The PPO trainer's mismatch metrics of ``batch`` (its first forward, before any update)."""
    ppo = PPOTrainer(actor, critic, dataclasses.replace(cfg.rl, routing_replay=replay), temperature=1.0)
    return ppo.prepare(dict(batch))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=["train.micro_batch_size=4", f"train.seed={args.seed}"])
    ps = ParallelState.single()
    actor = Trainer(rl_trainer_config(cfg, "actor", args.prompts), ps)
    critic = Trainer(rl_trainer_config(cfg, "critic", args.prompts), ps)
    init_critic_from_actor(critic, actor)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(8, cfg.model.vocab_size, (int(torch.randint(8, 25, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    m = cfg.model
    print(f"tiny preset: {m.num_layers} layers ({m.num_layers - m.num_dense_layers} MoE), {m.moe.num_experts} experts top-{m.moe.top_k} "
          f"({m.moe.score_function}), hidden {m.hidden_size}; {args.prompts} prompts of 8-24 tokens, {args.new_tokens} new tokens, "
          f"temperature 1; training micro-batches of {cfg.train.micro_batch_size} rows, eager fp32; {args.threads} thread(s)")
    header = ["rollout", "rl.routing_replay", "route diff", "|dlogp| mean", "|dlogp| max", "frac > 1e-3", "seq log-ratio std"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, changes, one_row in SETTINGS:
        start = time.perf_counter()
        out = rollout(actor, changes, one_row, prompts, args.new_tokens, args.seed)
        batch = from_rollout(out, [0.0] * args.prompts, [False] * args.prompts)
        for replay in ("off", "rollout"):
            got = measure(actor, critic, cfg, batch, replay)
            print(f"| {name} | {replay} | " + " | ".join(f"{got[k]:.3g}" for k in COLUMNS) + " |", flush=True)
        print(f"    ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
