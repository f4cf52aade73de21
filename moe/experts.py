"""Routed experts as stacked weights with a grouped GEMM, and the shared experts.

Shapes: ``L`` local experts (``E / ep``), ``F`` expert ffn size (``F / etp`` locally),
``H`` hidden, ``N`` rows sorted by local expert.

Parameters (full shapes; the HF converter maps them to Qwen3-MoE names):

* ``w_gate_up [E, 2, F, H]``: ``[:, 0]`` is ``mlp.experts.{e}.gate_proj.weight``,
  ``[:, 1]`` is ``up_proj.weight`` (HF's fused ``gate_up_proj [E, 2F, H]`` is its reshape).
* ``w_down [E, H, F]``: ``mlp.experts.{e}.down_proj.weight``.

Both are split over ep along dim 0 and over etp along the F dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_seed.parallel.sharding import ShardDim, set_sharding
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class GroupedExperts(nn.Module):
    """``out = down(w * silu(gate(x)) * up(x))`` per expert, all local experts in two grouped GEMMs."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, ps: ParallelState):
        super().__init__()
        ep, etp = ps.size("ep"), ps.size("etp")
        if num_experts % ep or ffn_size % etp:
            raise ValueError(
                f"GroupedExperts: num_experts={num_experts} must divide by ep={ep} and ffn_size={ffn_size} by etp={etp}; "
                "fix: change model.moe.num_experts / ffn_size or parallel.ep / etp"
            )
        self.num_local_experts, self.local_ffn = num_experts // ep, ffn_size // etp
        self.w_gate_up = nn.Parameter(torch.empty(self.num_local_experts, 2, self.local_ffn, hidden_size))
        set_sharding(self.w_gate_up, (num_experts, 2, ffn_size, hidden_size), (ShardDim(0, "ep", ep), ShardDim(2, "etp", etp)), is_expert=True)
        self.w_down = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, self.local_ffn))
        set_sharding(self.w_down, (num_experts, hidden_size, ffn_size), (ShardDim(0, "ep", ep), ShardDim(2, "etp", etp)), is_expert=True)

    def forward(self, rows_NH: torch.Tensor, tokens_per_expert_L: torch.Tensor, kernels, weights_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows sorted by local expert, ``tokens_per_expert_L`` rows each; partial sums under etp.

        ``weights_N`` (each row's routing weight) scales the SwiGLU output, so the result
        is ``w * expert(x)`` (the down projection is linear).
        """
        L, F_, H = self.num_local_experts, self.local_ffn, self.w_down.shape[1]
        w_gate_up_LHO = self.w_gate_up.view(L, 2 * F_, H).transpose(1, 2)
        gate_up_NO = kernels.grouped_mm(rows_NH, w_gate_up_LHO, tokens_per_expert_L)
        return kernels.grouped_mm(kernels.swiglu(gate_up_NO, weights_N), self.w_down.transpose(1, 2), tokens_per_expert_L)


class SharedExperts(nn.Module):
    """DeepSeek-style shared experts fused into one SwiGLU of ``num * ffn`` (tp-parallel, no gate).

    Parameters ``gate_proj.weight``, ``up_proj.weight`` ``[num*ffn, H]`` and
    ``down_proj.weight [H, num*ffn]``.
    """

    def __init__(self, hidden_size: int, ffn_size: int, ps: ParallelState):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, ffn_size, ps)
        self.up_proj = ColumnParallelLinear(hidden_size, ffn_size, ps)
        self.down_proj = RowParallelLinear(ffn_size, hidden_size, ps)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_full = self.gate_proj.prepare_input(x_BSH)
        return self.down_proj(F.silu(self.gate_proj(x_full, prepared=True)) * self.up_proj(x_full, prepared=True))
