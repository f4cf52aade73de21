"""It learns: the README's main job on ``configs/rl-tiny.yaml`` for several seeds, held-out accuracy after SFT and after PPO.

Per seed (``train.seed = 1234 + seed``): the SFT phase on worked solutions
(``megatron-seed sft`` with the job's config), then the RL trainer from that policy
(value pretraining, PPO, held-out evaluations before and after PPO). The held-out
accuracy is the evaluator's greedy accuracy over every held-out prompt
(:mod:`rl.evaluate`: the task's exact answer / every unit test, never the training
reward). ``--ablate`` also runs plain PPO from the same SFT policy on the same seed: one
lambda 0.95 for actor and critic (no length adaptation), a symmetric clip 0.2, no value
pretraining, no positive-example LM loss, uniform domain weights. Both arms start from
the same weights, so their "after SFT" accuracy is the same number.

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

PLAIN_PPO = ["rl.length_adaptive=false", "rl.lambda_policy=0.95", "rl.lambda_value=0.95", "rl.eps_low=0.2", "rl.eps_high=0.2",
             "rl.value_pretrain_steps=0", "rl.lm_loss_coef=0.0", "rl.adaptation_rule=uniform"]
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "rl-tiny.yaml"


def run_arm(config: str, overrides: list, sft_checkpoint: str, save_dir: str) -> tuple:
    """RL from ``sft_checkpoint``: ``(accuracy before PPO, accuracy after PPO, seconds)``."""
    from megatron_seed.config import load_config
    from rl.rl_trainer import RLTrainer

    cfg = load_config(None, config, overrides + [f"train.load_dir={sft_checkpoint}", "sft.steps=0", f"train.save_dir={save_dir}",
                                                 "train.progress=false"])
    t0 = time.perf_counter()
    evals = RLTrainer.from_config(cfg).fit()["evals"]
    return evals["before_ppo"]["all"]["greedy"], evals["after_ppo"]["all"]["greedy"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablate", action="store_true", help="also run plain PPO from the same SFT policy")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()

    from megatron_seed.commands.sft import sft_main
    from megatron_seed.config import load_config
    from megatron_seed.train import checkpoint

    root = args.out or tempfile.mkdtemp(prefix="bench_rl_learning-")
    arms = {"full recipe": []} | ({"plain PPO": PLAIN_PPO} if args.ablate else {})
    rows = []
    for seed in args.seeds:
        base = list(args.overrides) + [f"train.seed={1234 + seed}"]
        sft_dir = os.path.join(root, f"seed{seed}", "sft")
        t0 = time.perf_counter()
        sft_main(load_config(None, args.config, base + [f"train.save_dir={sft_dir}", "train.progress=false"]))
        sft_s = time.perf_counter() - t0
        sft_checkpoint = checkpoint.latest_checkpoint(sft_dir)
        row = {"seed": seed, "sft_s": sft_s}
        for name, extra in arms.items():
            before, after, seconds = run_arm(args.config, base + extra, sft_checkpoint, os.path.join(root, f"seed{seed}", name.replace(" ", "_")))
            row[name] = (before, after, seconds)
            print(f"seed {seed} {name}: held-out accuracy after SFT {100 * before:.1f}% -> after PPO {100 * after:.1f}% "
                  f"({100 * (after - before):+.1f} points; SFT {sft_s:.0f} s, RL {seconds:.0f} s)", flush=True)
        rows.append(row)

    print(f"\nheld-out greedy accuracy (%), config {args.config}, runs under {root}")
    header = f"{'seed':>4} {'after SFT':>10}" + "".join(f" {name + ' after PPO':>24} {'gain':>7}" for name in arms)
    print(header)
    for row in rows:
        before = row["full recipe"][0]
        print(f"{row['seed']:>4} {100 * before:>10.1f}" + "".join(f" {100 * row[n][1]:>24.1f} {100 * (row[n][1] - row[n][0]):>+7.1f}" for n in arms))
    gains = {n: sum(r[n][1] - r[n][0] for r in rows) / len(rows) for n in arms}
    mean_before = sum(r["full recipe"][0] for r in rows) / len(rows)
    print(f"{'mean':>4} {100 * mean_before:>10.1f}" + "".join(f" {100 * sum(r[n][1] for r in rows) / len(rows):>24.1f} {100 * gains[n]:>+7.1f}"
                                                         for n in arms))
    if args.ablate:
        print(f"mean gain (plain PPO): {100 * gains['plain PPO']:+.1f} points")
    print(f"mean gain: {100 * gains['full recipe']:+.1f} points")


if __name__ == "__main__":
    main()
