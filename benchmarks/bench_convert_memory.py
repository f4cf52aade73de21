"""Peak memory of streaming conversions of a model ~10x the ``tiny`` preset.

Saves a checkpoint of the tiny preset scaled up (10 layers, hidden 256, 24 experts: 10.7x
its parameters), then runs, each in a fresh process, ``convert to-hf``, ``convert from-hf``
and ``convert to-mcore`` with 16 MiB output files, and a process that only imports what
a conversion imports (the baseline). Prints each one's peak RSS next to the model's bytes:
a streaming conversion should add about one output file, not the model.

    python benchmarks/bench_convert_memory.py
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_GB = 16 / 1024
BASELINE = "import megatron_seed.commands.convert, megatron_seed.convert.hf, megatron_seed.convert.mcore, transformers; transformers.Glm4MoeConfig"


def peak_rss_mib(args: list) -> float:
    """Peak RSS of a child process (``ru_maxrss`` of a wait4 on it alone). Linux records the
    forked parent's high-water mark at exec too, so this parent stays small (it imports no torch)."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT)}
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{args} failed: {proc.stderr.read()[-2000:]}")
    return usage.ru_maxrss / 1024, proc.stdout.read()


def save_scaled_tiny(save_dir: str) -> None:
    """Write the checkpoint (in a child process) and print the model's size."""
    import torch

    from megatron_seed.config import load_config
    from megatron_seed.params import count_parameters
    from megatron_seed.parallel.state import ParallelState
    from megatron_seed.train.trainer import Trainer

    base = load_config("tiny")
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, num_layers=10, hidden_size=256,
                                                              moe=dataclasses.replace(base.model.moe, num_experts=24)))
    cfg.train.save_dir = save_dir
    torch.manual_seed(0)
    Trainer(cfg, ParallelState.single()).save()
    total = count_parameters(cfg.model).total
    print(total, total / count_parameters(base.model).total)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        _, printed = peak_rss_mib([os.path.abspath(__file__), "--save", ckpt])
        total, ratio = printed.split()
        model_mib = int(total) * 4 / 2**20
        cli = ["-m", "megatron_seed.cli", "convert"]
        shard = ["--max-shard-gb", str(SHARD_GB)]
        rows = [
            ("imports only (baseline)", peak_rss_mib(["-c", BASELINE])[0]),
            ("convert to-hf", peak_rss_mib([*cli, "to-hf", "--load", ckpt, "--out", f"{tmp}/hf", *shard])[0]),
            ("convert from-hf", peak_rss_mib([*cli, "from-hf", "--hf", f"{tmp}/hf", "--out", f"{tmp}/back", *shard])[0]),
            ("convert to-mcore", peak_rss_mib([*cli, "to-mcore", "--load", ckpt, "--out", f"{tmp}/mcore", *shard])[0]),
        ]
    print(f"model: {int(total) / 1e6:.1f}M parameters ({float(ratio):.1f}x tiny), {model_mib:.0f} MiB in fp32; "
          f"output files <= {SHARD_GB * 1024:.0f} MiB")
    baseline = rows[0][1]
    for name, rss in rows:
        print(f"{name:<24} peak RSS {rss:7.0f} MiB   above baseline {rss - baseline:6.0f} MiB = {(rss - baseline) / model_mib:.2f} x model")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--save":
        save_scaled_tiny(sys.argv[2])
    else:
        main()
