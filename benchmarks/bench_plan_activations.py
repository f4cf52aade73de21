"""Planner vs reality: predicted activation peak against the measured one, real tiny training steps on CPU.

What is measured and predicted: :mod:`megatron_seed.plan.measured`. Prints both and their
ratio for the first and the last rank of every layout::

    .venv/bin/python benchmarks/bench_plan_activations.py            # layouts of up to 4 processes
    .venv/bin/python benchmarks/bench_plan_activations.py --max-world 2
"""
from __future__ import annotations

import argparse

from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.plan.layout import PlanLayout
from megatron_seed.plan.measured import GLOBAL_BATCH, MICRO_BATCH, MODEL, SEQ, measure, predicted

LAYOUTS = [
    PlanLayout(),
    PlanLayout(tp=2),
    PlanLayout(pp=2),
    PlanLayout(ep=2, dp=2),
    PlanLayout(pp=2, vpp=2),
    PlanLayout(tp=2, pp=2),
    PlanLayout(tp=2, ep=2, dp=2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-world", type=int, default=4)
    args = parser.parse_args()
    print(f"tiny GPT-MoE: hidden {MODEL.hidden_size}, {MODEL.num_layers} layers, vocab {MODEL.vocab_size}, "
          f"seq {SEQ}, micro-batch {MICRO_BATCH}, global batch {GLOBAL_BATCH}, fp32")
    print(f"{'layout':<36} {'rank':>4} {'predicted KiB':>14} {'measured KiB':>13} {'pred/meas':>10}")
    worst = 0.0
    for layout in (l for l in LAYOUTS if l.world <= args.max_world):
        measured = run_distributed(measure, layout.world, layout) if layout.world > 1 else [measure(0, 1, layout)]
        for rank in sorted({0, layout.world - 1}):
            pred = predicted(layout, rank)
            ratio = pred / measured[rank]
            worst = max(worst, abs(ratio - 1))
            print(f"{layout.label():<36} {rank:>4} {pred / 1024:>14.0f} {measured[rank] / 1024:>13.0f} {ratio:>10.3f}")
    print(f"largest deviation: {worst:.1%} (target: within 25%)")


if __name__ == "__main__":
    main()
