"""Small building blocks: RMSNorm, rotary embeddings, the dense SwiGLU MLP.

Weights replicated over tp whose gradient each rank sees only in part (a norm under
sequence parallel sees S/tp tokens; a QK-norm sees its local heads) are marked
``partial_tp_grad``; the optimizer sums their gradients over tp once per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_seed.parallel.sharding import set_sharding
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (as HF Qwen3)."""

    def __init__(self, size: int, eps: float, partial_tp_grad: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))
        set_sharding(self.weight, (size,), init="ones", partial_tp_grad=partial_tp_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids_BS: torch.Tensor, head_dim: int, theta: float) -> tuple:
    """cos/sin tables ``[B, S, D]`` for positions, HF's non-interleaved layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids_BS.device) / head_dim))
    freqs_BSd = position_ids_BS.float().unsqueeze(-1) * inv_freq
    emb_BSD = torch.cat([freqs_BSd, freqs_BSd], dim=-1)
    return emb_BSD.cos(), emb_BSD.sin()


def apply_rotary(x_BNSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_BSD.unsqueeze(1).to(x_BNSD.dtype), sin_BSD.unsqueeze(1).to(x_BNSD.dtype)
    return x_BNSD * cos + rotated * sin


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate/up column-parallel and down row-parallel."""

    def __init__(self, hidden_size: int, ffn_size: int, ps: ParallelState):
        super().__init__()
        self.ps = ps
        self.gate_proj = ColumnParallelLinear(hidden_size, ffn_size, ps)
        self.up_proj = ColumnParallelLinear(hidden_size, ffn_size, ps)
        self.down_proj = RowParallelLinear(ffn_size, hidden_size, ps)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x_full = self.gate_proj.prepare_input(x_BSH)
        h = F.silu(self.gate_proj(x_full, prepared=True)) * self.up_proj(x_full, prepared=True)
        return self.down_proj(h)
