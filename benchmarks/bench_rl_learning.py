"""It learns: the README's main job on ``configs/rl-tiny.yaml`` for several seeds, held-out accuracy after SFT and after PPO.

Per seed (``train.seed = 1234 + seed``) the whole job runs as ``megatron-seed rl`` runs it
(:class:`rl.rl_trainer.RLTrainer`: SFT warm-up on worked solutions without the held-out
prompts, value pretraining, PPO, held-out evaluations before and after PPO). The held-out
accuracy is the evaluator's greedy accuracy over every held-out prompt (:mod:`rl.evaluate`:
the task's exact answer / every unit test, never the training reward). ``--ablate`` also
runs plain PPO from the same seed's SFT policy (the job's checkpoint at the end of SFT): one
lambda 0.95 for actor and critic (no length adaptation), a symmetric clip 0.2, no value
pretraining, no positive-example LM loss, uniform domain weights. Both arms start from the
same weights, so their "after SFT" accuracy is the same number.

    .venv/bin/python benchmarks/bench_rl_learning.py [--seeds 0 1 2] [--ablate] [--config configs/rl-tiny.yaml] [--set k=v ...] [--out DIR]

Ends with ``mean gain: +N points`` (the full recipe, mean over the seeds of after-PPO
minus after-SFT accuracy, in percentage points).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

PLAIN_PPO = ["rl.length_adaptive=false", "rl.lambda_policy=0.95", "rl.lambda_value=0.95", "rl.eps_low=0.2", "rl.eps_high=0.2",
             "rl.value_pretrain_steps=0", "rl.lm_loss_coef=0.0", "rl.adaptation_rule=uniform"]
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "rl-tiny.yaml"


def run_arm(config: str, overrides: list, save_dir: str, sft_checkpoint: Optional[str] = None) -> tuple:
    """One RL job (from ``sft_checkpoint`` without an SFT phase when given): ``(held-out before PPO, after PPO, seconds)``,
    each ``{"greedy", "sampled", "pass@k"}`` over every held-out prompt (:meth:`rl.evaluate.EvalReport.table`)."""
    from megatron_seed.config import load_config
    from rl.rl_trainer import RLTrainer

    start = [f"train.load_dir={sft_checkpoint}", "sft.steps=0"] if sft_checkpoint else []
    cfg = load_config(None, config, overrides + start + [f"train.save_dir={save_dir}", "train.progress=false"])
    t0 = time.perf_counter()
    evals = RLTrainer.from_config(cfg).fit()["evals"]
    return evals["before_ppo"]["all"], evals["after_ppo"]["all"], time.perf_counter() - t0


def sft_end_checkpoint(save_dir: str) -> str:
    """The actor's checkpoint at the end of the job's SFT phase (saved before PPO's first optimizer step)."""
    path = os.path.join(save_dir, "actor", "iter_0000000")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: the job saved no checkpoint at the end of SFT")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablate", action="store_true", help="also run plain PPO from the same SFT policy")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--metric", default="greedy", help="the accuracy of the mean-gain line: greedy, or sampled "
                        "(mean over rl.eval_samples samples at the rollout temperature, i.e. pass@1)")
    args = parser.parse_args()

    root = args.out or tempfile.mkdtemp(prefix="bench_rl_learning-")
    arms = {"full recipe": []} | ({"plain PPO": PLAIN_PPO} if args.ablate else {})
    rows = []
    for seed in args.seeds:
        base = list(args.overrides) + [f"train.seed={1234 + seed}"]
        full_dir = os.path.join(root, f"seed{seed}", "full_recipe")
        row = {"seed": seed, "full recipe": run_arm(args.config, base, full_dir)}
        if args.ablate:
            row["plain PPO"] = run_arm(args.config, base + PLAIN_PPO, os.path.join(root, f"seed{seed}", "plain_PPO"),
                                       sft_end_checkpoint(full_dir))
        for name in arms:
            before, after, seconds = row[name]
            measures = "; ".join(f"{k} {100 * before[k]:.1f}% -> {100 * after[k]:.1f}%" for k in before)
            print(f"seed {seed} {name}: held-out after SFT -> after PPO: {measures} ({seconds:.0f} s)", flush=True)
        rows.append(row)

    for metric in rows[0]["full recipe"][0]:
        print(f"\nheld-out {metric} accuracy (%), config {args.config}, runs under {root}")
        print(f"{'seed':>4} {'after SFT':>10}" + "".join(f" {name + ' after PPO':>24} {'gain':>7}" for name in arms))
        for row in rows:
            print(f"{row['seed']:>4} {100 * row['full recipe'][0][metric]:>10.1f}"
                  + "".join(f" {100 * row[n][1][metric]:>24.1f} {100 * (row[n][1][metric] - row[n][0][metric]):>+7.1f}" for n in arms))
        mean = {n: (sum(r[n][0][metric] for r in rows) / len(rows), sum(r[n][1][metric] for r in rows) / len(rows)) for n in arms}
        print(f"{'mean':>4} {100 * mean['full recipe'][0]:>10.1f}"
              + "".join(f" {100 * mean[n][1]:>24.1f} {100 * (mean[n][1] - mean[n][0]):>+7.1f}" for n in arms))
    gains = {n: sum(r[n][1][args.metric] - r[n][0][args.metric] for r in rows) / len(rows) for n in arms}
    if args.ablate:
        print(f"mean gain (plain PPO, {args.metric}): {100 * gains['plain PPO']:+.1f} points")
    print(f"mean gain ({args.metric}): {100 * gains['full recipe']:+.1f} points")


if __name__ == "__main__":
    main()
