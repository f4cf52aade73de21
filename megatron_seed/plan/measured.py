"""The planner against real steps: the activation peak of tiny training steps on CPU, measured
and predicted, for ``benchmarks/bench_plan_activations.py`` and its test.

Each layout runs the same tiny GPT-MoE (fp32, gloo, one process per rank): one warm-up step,
then one more step's forward/backward (every micro-batch, the layout's pipeline schedule)
under :class:`LiveBytes`, which follows every storage an op creates until it is freed.
Measured = the peak of those live bytes, parameter gradients excluded (activations kept for
backward, their gradients, dispatch and loss temporaries, pipeline receive buffers; torch's
``MemTracker`` refuses modules called once per micro-batch). Predicted = the planner's
``activations + moe_dispatch + logits`` for that rank (:mod:`megatron_seed.plan.memory`),
with the expert rows taken as balanced (``moe_imbalance=1``).
"""
from __future__ import annotations

import dataclasses
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_seed.config import Config, MoEConfig, ModelConfig, TrainConfig
from megatron_seed.parallel.state import ParallelState
from megatron_seed.plan.inputs import Assumptions, Workload
from megatron_seed.plan.layout import PlanLayout
from megatron_seed.plan.memory import global_rank_memory
from megatron_seed.train.trainer import Trainer, lm_batch, lm_loss_fn, split_microbatches

MODEL = ModelConfig(vocab_size=256, hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2, head_dim=16,
                    max_seq_len=256, num_dense_layers=1, dense_ffn_size=128,
                    moe=MoEConfig(num_experts=4, top_k=2, ffn_size=64, num_shared_experts=1, shared_ffn_size=64))
SEQ, MICRO_BATCH, GLOBAL_BATCH = 128, 4, 16


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create while active, less those that become parameter gradients."""

    def __init__(self, params: list):
        super().__init__()
        self.live: dict = {}  # id(storage) -> bytes
        self.refs: dict = {}  # id(storage) -> weakref (its callback forgets the storage when freed)
        self.current = self.peak = 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._is_gradient) for p in params]

    def _forget(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def _is_gradient(self, p: torch.Tensor) -> None:
        self._forget(id(p.grad.untyped_storage()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.refs[key] = weakref.ref(storage, lambda _, key=key: self._forget(key))
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
        return out

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)


def tiny_config(layout: PlanLayout) -> Config:
    train = TrainConfig(micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH, seq_len=SEQ, progress=False)
    cfg = Config(model=MODEL, train=train)
    cfg.parallel = dataclasses.replace(layout.parallel_config(), overlap_grad_reduce=False)
    return cfg


def measure(rank: int, world: int, layout: PlanLayout) -> float:
    """Activation peak (bytes) of one training step's forward/backward on this rank."""
    cfg = tiny_config(layout)
    ps = ParallelState.build(cfg.parallel, world, rank) if world > 1 else ParallelState.single()
    trainer = Trainer(cfg, ps)
    tokens = torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    rows = GLOBAL_BATCH // ps.dp_size
    batch = lm_batch(tokens[ps.dp_rank * rows:(ps.dp_rank + 1) * rows])
    trainer.train_step(batch)  # warm-up: lazily built state exists before measuring
    tracker = LiveBytes([p for chunk in trainer.chunks for p in chunk.parameters()])
    normaliser = float(GLOBAL_BATCH * SEQ)
    with tracker:
        trainer.forward_backward(split_microbatches(batch, MICRO_BATCH), lm_loss_fn(ps, normaliser))
    return float(tracker.peak)


def predicted(layout: PlanLayout, rank: int) -> float:
    w = Workload(seq_len=SEQ, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, precision="fp32")
    mem = global_rank_memory(MODEL, layout, w, Assumptions(moe_imbalance=1.0), rank)
    return mem.activations + mem.moe_dispatch + mem.logits
