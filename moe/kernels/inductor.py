"""The torch reference ops with the SwiGLU compiled by TorchInductor (``kernel_backend=inductor``).

On CPU the expert path's memory-bound work is the SwiGLU between the two grouped GEMMs:
eager PyTorch runs its forward in 2-3 passes over ``[N, F]`` and its backward in 7 (see
:func:`moe.kernels.reference._swiglu_backward`). Written as plain formulas and compiled,
each becomes one fused loop (the backward also folds the routing-weight gradient's row sum
into it), about 2x faster on one core. Everything else is the reference implementation.

Shapes are left to torch.compile's automatic dynamism: the first call compiles for its exact
shape, and when the row count changes (expert parallelism, capacity dropping) it compiles
once more with the rows symbolic, while the ffn width stays a constant. That width being
known is worth it: the backward runs in 0.54 ms instead of 0.86 with every size symbolic
(N = 4096, F = 128, one core). A compile takes seconds to tens of seconds; TorchInductor
caches its results on disk for later processes. It needs a C++ compiler on CPU and Triton
on GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from moe.kernels.reference import SwiGLUImpl, combine_rows, grouped_mm, permute, sort_slots, topk_routing, unpermute  # noqa: F401
from moe.kernels.reference import swiglu as _swiglu


def _swiglu_forward(gate_up_N2F: torch.Tensor, weights_N: Optional[torch.Tensor]) -> torch.Tensor:
    """``w[:, None] * silu(gate) * up``."""
    gate, up = gate_up_N2F.chunk(2, dim=1)
    out = torch.nn.functional.silu(gate) * up
    return out if weights_N is None else out * weights_N.unsqueeze(1)


def _swiglu_backward(grad_NF: torch.Tensor, gate_up_N2F: torch.Tensor, weights_N: Optional[torch.Tensor], need_d_weights: bool) -> tuple:
    """``d_gate = g w up sig (1 + gate (1 - sig))``, ``d_up = g w silu(gate)``, ``d_w = sum_f g silu(gate) up``
    with ``sig = sigmoid(gate)``."""
    gate, up = gate_up_N2F.chunk(2, dim=1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    weighted = grad_NF if weights_N is None else grad_NF * weights_N.unsqueeze(1)
    d_gate_up = torch.cat([weighted * up * (sig * (1 + gate * (1 - sig))), weighted * silu], dim=1)
    d_weights = (grad_NF * silu * up).sum(1) if weights_N is not None and need_d_weights else None
    return d_gate_up, d_weights


COMPILED_SWIGLU = SwiGLUImpl(torch.compile(_swiglu_forward), torch.compile(_swiglu_backward))


def swiglu(gate_up_N2F: torch.Tensor, weights_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`moe.kernels.reference.swiglu`, compiled."""
    return _swiglu(gate_up_N2F, weights_N, COMPILED_SWIGLU)
