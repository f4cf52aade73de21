"""Greedy agreement of bf16 and fp32 rollout on a trained policy: the README job's actor on its held-out prompts.

A randomly initialised model's next-token distributions are nearly flat, so bf16 rounding of
its logits reorders near-ties (``bench_rollout.py`` measures that case on random weights); a
trained policy separates its choices. This loads the actor checkpoint an RL run saved
(``--load-dir``, default ``runs/rl/actor``, where ``make demo`` leaves it), renders the run's
held-out prompts as its evaluator does (``--preset``'s task families, difficulty, system turn
and seed), generates greedy responses with ``rollout.dtype`` fp32 and bf16 from the same
weights and prints the share of fp32's response positions where bf16 has the same token:
free-running (a row's first difference changes the rest of it; a missing position counts as
different) and teacher-forced (bf16's argmax given fp32's sequence so far, every position
scored on the same prefix), and the share of whole responses that are identical.

    make demo   # or: .venv/bin/megatron-seed rl --preset rl-tiny --set train.save_dir=runs/rl
    .venv/bin/python benchmarks/bench_rollout_agreement.py [--load-dir runs/rl/actor] [--preset rl-tiny] [--prompts 128]
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from data.tasks import generate_prompts, system_prompt
from megatron_seed.config import load_config
from megatron_seed.model.build import build_model_chunks
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.checkpoint import load_model_weights
from megatron_seed.train.run_setup import load_run_tokenizer
from rl.experience import render_prompts
from rl.rollout.engine import RolloutEngine
from rl.rollout.sampling import SamplingParams


@torch.no_grad()
def teacher_forced_hits(model: GPTModel, prompt: list, response: list) -> int:
    """Positions of ``response`` where ``model``'s argmax, given ``prompt`` and the response so far, is the response's token."""
    ids = torch.tensor([prompt + response])
    predicted = model(ids)[0, len(prompt) - 1:-1].argmax(dim=-1)
    return int((predicted == ids[0, len(prompt):]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-dir", default="runs/rl/actor", help="an actor checkpoint directory (an RL run's save_dir/actor)")
    parser.add_argument("--preset", default="rl-tiny", help="the run's preset: model, tokenizer, tasks, system turn, seed")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: the preset's rl.eval_prompts)")
    args = parser.parse_args()
    cfg = load_config(args.preset)
    torch.set_num_threads(1)
    ps = ParallelState.single()
    tokenizer = load_run_tokenizer(cfg)
    chunks = build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed)
    load_model_weights(chunks, ps, args.load_dir)
    records = generate_prompts(args.prompts or cfg.rl.eval_prompts, seed=cfg.train.seed + 1, families=cfg.data.task_families,
                               difficulty=tuple(cfg.data.task_difficulty))
    prompts = render_prompts(records, tokenizer, system_prompt(cfg.data.system_prompt))
    greedy = SamplingParams(temperature=0.0)
    responses = {}
    engines = {dtype: RolloutEngine(chunks, ps, replace(cfg.rollout, dtype=dtype), tokenizer=tokenizer) for dtype in ("fp32", "bf16")}
    for dtype, engine in engines.items():
        responses[dtype] = engine.generate(prompts, n=1, sampling=greedy).responses()
    fp32, bf16 = responses["fp32"], responses["bf16"]
    positions = sum(len(r) for r in fp32)
    free = sum(sum(a == b for a, b in zip(r32, r16)) for r32, r16 in zip(fp32, bf16))
    forced = sum(teacher_forced_hits(engines["bf16"].policy, p, r) for p, r in zip(prompts, fp32))
    same = sum(r32 == r16 for r32, r16 in zip(fp32, bf16))
    print(f"{args.load_dir} ({args.preset}): {len(prompts)} held-out prompts, {positions} fp32 response positions, greedy")
    print(f"  bf16 vs fp32: {free / positions:.2%} of positions free-running, {forced / positions:.2%} teacher-forced, "
          f"{same / len(prompts):.2%} of responses identical")


if __name__ == "__main__":
    main()
