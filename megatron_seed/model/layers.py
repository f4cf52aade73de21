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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * (x / sqrt(mean(x^2) + eps)) over the last dim, normalised in fp32 and cast back
    before the weight (as HF Qwen3). ``weight`` broadcasts against ``x``: ``[size]``, or e.g.
    ``[heads, D]`` for per-head weights.

    ``F.rms_norm`` is one dispatched call instead of five; with the weight passed in, 8 vs 11 us
    at decode sizes on CPU (where per-op overhead dominates), 19 vs 22 us with cold caches.
    That form multiplies by the weight before any cast back, so it serves fp32 only.
    """
    if x.dtype == weight.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (as HF Qwen3); see :func:`rms_norm`."""

    def __init__(self, size: int, eps: float, partial_tp_grad: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))
        set_sharding(self.weight, (size,), init="ones", partial_tp_grad=partial_tp_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotary_cos_sin(position_ids_BS: torch.Tensor, head_dim: int, theta: float) -> tuple:
    """Tables ``(cos, sin)``, ``[B, S, 1, D]`` (they broadcast over the heads of ``[B, S, heads, D]``),
    for :func:`apply_rotary`, HF's non-interleaved layout: angle ``p * theta^(-2i/D)`` at ``i`` and
    ``i + D/2``. ``sin``'s first half is negated, which folds rotate_half's sign into the table."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids_BS.device) / head_dim))
    freqs_BSd = position_ids_BS.float().unsqueeze(-1) * inv_freq
    sin_BSd = freqs_BSd.sin()
    cos_BSD = torch.cat([freqs_BSd, freqs_BSd], dim=-1).cos()
    return cos_BSD.unsqueeze(2), torch.cat([-sin_BSd, sin_BSd], dim=-1).unsqueeze(2)


def apply_rotary(x_BSXD: torch.Tensor, cos_BS1D: torch.Tensor, sin_BS1D: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] (x: ``[B, S, heads, D]``).

    ``roll(x, D/2) = [x2, x1]`` and the tables carry the sign (:func:`rotary_cos_sin`), so no
    negation or chunking is needed per call (7.2 vs 9.6 us at B=16 on CPU); the products are
    the same, hence the same result bit for bit.
    """
    cos, sin = cos_BS1D.to(x_BSXD.dtype), sin_BS1D.to(x_BSXD.dtype)
    return x_BSXD * cos + x_BSXD.roll(x_BSXD.shape[-1] // 2, dims=-1) * sin


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
