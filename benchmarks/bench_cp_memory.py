"""Memory of one training step under context parallelism: cp=2 vs cp=1 at the same sequence length.

Each layout runs in fresh gloo processes (``run_distributed``): the tiny GPT-MoE below
(dense and MoE layers, GQA) takes one training step on one sequence of ``--seq`` tokens.
Per rank it reports

* activations: bytes autograd saved for the backward during the forward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters not counted), and
* step peak: the process's peak resident memory during the step above its peak before
  it (model, optimizer and imports are already resident), from ``getrusage``;

and prints cp=2's worst rank over cp=1 for both. Expect ~1/cp for activations, plus the
gathered K/V (``2 S K D`` per layer, kept for the backward) and, on CPU, the causal masks:
CPU SDPA materialises each chunk's lower-right causal bias as an fp32 ``[L, (c+1) L]``
mask it keeps for the backward (counted separately; CUDA's memory-efficient kernel
takes the lower-right causal form without a mask).
Usage: ``python benchmarks/bench_cp_memory.py [--seq 8192 --hidden 64 --layers 2]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_seed.config import Config, MoEConfig, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megatron_seed.parallel.spawn import run_distributed  # noqa: E402
from megatron_seed.parallel.state import ParallelState  # noqa: E402
from megatron_seed.train.trainer import Trainer, lm_batch  # noqa: E402


def bench_config(seq: int, hidden: int, layers: int, cp: int) -> Config:
    model = ModelConfig(vocab_size=256, hidden_size=hidden, num_layers=layers, num_attention_heads=8, num_kv_heads=2,
                        head_dim=hidden // 8, max_seq_len=seq, num_dense_layers=1, dense_ffn_size=2 * hidden,
                        moe=MoEConfig(num_experts=4, top_k=2, ffn_size=hidden, num_shared_experts=1, shared_ffn_size=hidden))
    train = TrainConfig(steps=1, micro_batch_size=1, global_batch_size=1, seq_len=seq, lr=1e-3, min_lr=1e-3, warmup_steps=0,
                        log_interval=1, progress=False)
    return Config(model=model, train=train, parallel=dataclasses.replace(ParallelConfig(), cp=cp))


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward, parameters excluded."""

    def __init__(self, parameters: list, chunk: int):
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.chunk = chunk  # L = S / (2 cp) under cp, else 0
        self.storages: dict = {}
        self.masks: dict = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.parameter_storages:
            self.storages[storage.data_ptr()] = storage.nbytes()
            if self.chunk and t.dim() == 2 and t.shape[0] == self.chunk and t.shape[1] % self.chunk == 0:
                self.masks[storage.data_ptr()] = storage.nbytes()  # a chunk's [L, (c+1) L] causal mask
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def step_worker(rank: int, world: int, seq: int, hidden: int, layers: int) -> dict:
    cfg = bench_config(seq, hidden, layers, world)
    ps = ParallelState.build(cfg.parallel, world, rank)
    trainer = Trainer(cfg, ps)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    saved = SavedBytes([p for chunk in trainer.chunks for p in chunk.parameters()], seq // (2 * world) if world > 1 else 0)
    before = peak_rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = trainer.train_step(lm_batch(tokens))["loss"]
    return {"activations": saved.total, "masks": sum(saved.masks.values()), "step_peak": peak_rss_bytes() - before, "loss": loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    one = run_distributed(step_worker, 1, args.seq, args.hidden, args.layers, timeout_s=600)[0]
    two = run_distributed(step_worker, 2, args.seq, args.hidden, args.layers, timeout_s=600)
    mib = 2.0 ** 20
    print(f"one training step, S={args.seq}, hidden {args.hidden}, {args.layers} layers (1 dense + MoE), GQA 8/2 heads, fp32")
    print(f"{'layout':<12} {'activations MiB':>16} {'of which masks':>15} {'step peak MiB':>14} {'loss':>10}")
    for name, out in [("cp=1", one)] + [(f"cp=2 rank {r}", o) for r, o in enumerate(two)]:
        print(f"{name:<12} {out['activations'] / mib:>16.1f} {out['masks'] / mib:>15.1f} {out['step_peak'] / mib:>14.1f} "
              f"{out['loss']:>10.6f}")
    act = max(o["activations"] for o in two) / one["activations"]
    unmasked = max(o["activations"] - o["masks"] for o in two) / one["activations"]
    peak = max(o["step_peak"] for o in two) / one["step_peak"]
    print(f"cp=2 / cp=1 (worst rank): activations {act:.3f} ({unmasked:.3f} without the causal masks), step peak {peak:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
