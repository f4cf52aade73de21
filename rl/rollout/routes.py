"""Routes the rollout records (R3): the experts every MoE layer chose for each token fed to the policy.

After each policy forward of a chunk (a prefill or a decode step) :class:`RouteRecorder`
reads each of this stage's MoE layers' ``last_routes_BSA`` (the whole sequence: the layers
all-gather a tp-split prefill while generating) and keeps them on the rollout's device, one-based
in int8 (int16 past 127 experts). :meth:`RouteRecorder.assemble` lays them out like the
:class:`~rl.rollout.outputs.RolloutBatch`'s tokens: prompt ``p`` of row ``b`` at columns
``[P - len(p), P)``, the token fed at decode step ``k`` (response token ``k - 1``) at column
``P + k - 1``; 0 elsewhere (padding, and each row's last token, which no forward saw). Under
pp each stage records its own layers and one all-reduce over pp gives every stage all of them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel import context_parallel
from megatron_seed.parallel.state import ParallelState


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type holding one-based expert ids ``1..num_experts`` (and 0 = none)."""
    return torch.int8 if num_experts <= 127 else torch.int16


class RouteRecorder:
    """One generation's routes (module docstring); nothing to record for a dense policy (``active`` False)."""

    def __init__(self, policy: GPTModel, ps: ParallelState, device: torch.device):
        cfg = policy.cfg
        self.ps, self.device = ps, device
        self.layers = policy.moe_layers_by_column()
        self.num_columns = cfg.num_layers - cfg.num_dense_layers
        self.top_k, self.dtype = cfg.moe.top_k, route_dtype(cfg.moe.num_experts)
        self.prompt_routes: dict = {}  # row -> [len(prompt), L_local, A], zero-based
        self.step_routes: list = []  # (rows, decode step k, [rows, L_local, A] zero-based)

    @property
    def active(self) -> bool:
        return self.num_columns > 0

    def _stacked(self) -> torch.Tensor:
        """``[B, S, L_local, A]`` zero-based routes of the last forward of this stage's MoE layers, in the compact dtype
        (two ops: a decode step pays for nothing else; the columns and the one-based ids are applied in :meth:`assemble`)."""
        return torch.stack([layer.last_routes_BSA for layer in self.layers.values()], dim=2).to(self.dtype) if self.layers else None

    def prefill(self, rows: list, prompts: list, sharded: bool) -> None:
        """After a chunk's prefill of left-padded ``prompts``; ``sharded``: the prefill was cut over cp."""
        routes = self._stacked()
        if routes is None:  # a pipeline stage without MoE layers: its columns come from the others
            return
        if sharded:
            routes = context_parallel.gather_sequence(routes, self.ps)
        width = routes.shape[1]
        for b, (row, prompt) in enumerate(zip(rows, prompts)):
            self.prompt_routes[row] = routes[b, width - len(prompt):]

    def decode(self, rows: list, step: int) -> None:
        """After decode step ``step`` (it fed each row's response token ``step - 1``) of the live ``rows``."""
        routes = self._stacked()
        if routes is not None:
            self.step_routes.append((list(rows), step, routes[:, 0]))

    def assemble(self, rows: int, prompt_width: int, width: int) -> torch.Tensor:
        """``[rows, width, L, A]`` in the layout of the batch's tokens (module docstring); collective over pp."""
        out = torch.zeros(rows, width, self.num_columns, self.top_k, dtype=self.dtype, device=self.device)
        columns = torch.tensor(list(self.layers), dtype=torch.long, device=self.device)
        for row, routes in self.prompt_routes.items():
            out[row, prompt_width - routes.shape[0]:prompt_width, columns] = routes + 1
        for rows_b, step, routes in self.step_routes:
            index_b = torch.as_tensor(rows_b, device=self.device)
            out[index_b[:, None], prompt_width + step - 1, columns[None, :]] = routes + 1
        if self.ps.pp_size > 1:  # every layer's column is filled on exactly one stage
            summed = out.to(torch.int32)
            dist.all_reduce(summed, group=self.ps.group("pp"))
            out = summed.to(self.dtype)
        return out
