"""Overlap the data-parallel gradient all-reduce with the last backward pass.

The flat gradient of one reduction bucket (its parameters in model order, the layout
:class:`~megatron_seed.train.optimizer.DistributedOptimizer` uses) is cut on parameter
boundaries into chunks of at least ``chunk_numel`` elements. A post-accumulate-grad
hook counts each parameter's accumulations; once every parameter of a chunk has
received all of the step's announced backward passes (one per micro-batch), the chunk's
gradients are copied into a flat tensor and an asynchronous all-reduce (SUM) starts
while backward goes on with earlier layers.

Chunks start strictly from the last to the first (the order backward completes them),
so every rank of the group issues the same collectives in the same order whatever the
timing. :meth:`GradReduceOverlap.finish` starts any chunk still waiting (a parameter that
missed a pass), waits for all of them and returns the reduced flat gradient: the same
numbers as one all-reduce of the whole buffer. Unarmed (no :meth:`arm` this step), the
hooks do nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class GradReduceOverlap:
    def __init__(self, params: list, group: Optional[dist.ProcessGroup], chunk_numel: int, reduce_dtype: torch.dtype = torch.float32):
        self.params, self.group, self.reduce_dtype = params, group, reduce_dtype
        self.chunks: list = []  # lists of parameter indices, in model order
        current: list = []
        size = 0
        for i, p in enumerate(params):
            current.append(i)
            size += p.numel()
            if size >= chunk_numel:
                self.chunks.append(current)
                current, size = [], 0
        if current:
            self.chunks.append(current)
        self.chunk_of = {i: c for c, members in enumerate(self.chunks) for i in members}
        self.index = {id(p): i for i, p in enumerate(params)}
        self.expected = 0
        self.reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def reset(self) -> None:
        """Forget this step's progress (called when gradients are zeroed)."""
        for _, work in getattr(self, "pending", []):
            work.wait()  # never leave a collective in flight behind a new step
        self.expected = 0
        self.passes = [0] * len(self.params)
        self.missing = [len(members) for members in self.chunks]  # parameters not yet complete per chunk
        self.next_chunk = len(self.chunks) - 1  # chunks start from the last
        self.pending: list = []  # (flat, work) in chunk order last -> first

    def arm(self, passes: int) -> None:
        """Announce ``passes`` backward passes (micro-batches) before the next :meth:`finish`."""
        self.reset()
        self.expected = passes

    @property
    def launched(self) -> int:
        return len(self.pending)

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.expected:
            return
        i = self.index[id(p)]
        chunk = self.chunk_of[i]
        if chunk > self.next_chunk:
            raise RuntimeError(
                f"parameter {i} of the gradient bucket accumulated a gradient after its data-parallel all-reduce "
                f"started: more than the {self.expected} backward passes announced with arm()"
            )
        self.passes[i] += 1
        if self.passes[i] == self.expected:
            self.missing[chunk] -= 1
            while self.next_chunk >= 0 and self.missing[self.next_chunk] == 0:
                self._launch(self.next_chunk)

    def _launch(self, chunk: int) -> None:
        grads = [self.params[i].grad for i in self.chunks[chunk]]
        flat = torch.cat([(g if g is not None else torch.zeros_like(self.params[i])).to(self.reduce_dtype).reshape(-1)
                          for g, i in zip(grads, self.chunks[chunk])])
        self.pending.append((flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        self.next_chunk -= 1

    def finish(self) -> torch.Tensor:
        """The all-reduced flat gradient of every parameter, in model order."""
        while self.next_chunk >= 0:
            self._launch(self.next_chunk)
        for _, work in self.pending:
            work.wait()
        flat = torch.cat([f for f, _ in reversed(self.pending)]) if self.pending else torch.zeros(0, dtype=self.reduce_dtype, device=self.params[0].device)
        self.pending = []
        self.expected = 0
        return flat
