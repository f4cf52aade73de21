"""GEMMs of inference forwards on a CPU without bf16 arithmetic.

On a CPU without AVX512-BF16 or AMX (an AVX2-only x86, like the CI box) torch multiplies bf16
and fp16 tensors in kernels that convert to fp32 inside, several times slower than its fp32
GEMMs at rollout sizes. Without gradients, :func:`linear` and :func:`matmul` multiply such
operands as fp32 and round the product once to their dtype: the product a native bf16 GEMM
gives (fp32 accumulation, one rounding at the end), at fp32 GEMM speed, while the weights stay
in memory at half the bytes (what a bf16 rollout reads per decode step). With gradients
(training keeps its own kernels and saves no fp32 copies for backward), on GPUs and on CPUs
with bf16 arithmetic they are ``F.linear`` and ``torch.matmul``. The MoE experts' inference
GEMM does the same (:func:`moe.kernels.reference.grouped_mm`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# read once: torch.compile then treats it as the constant it is
NATIVE_LOW_PRECISION_GEMM = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
LOW_PRECISION = (torch.bfloat16, torch.float16)


def emulated_low_precision(t: torch.Tensor) -> bool:
    """Whether ``t`` is a bf16/fp16 CPU tensor on a CPU without bf16 arithmetic (its GEMMs convert inside the kernel)."""
    return t.dtype in LOW_PRECISION and t.device.type == "cpu" and not NATIVE_LOW_PRECISION_GEMM


def upcasts(t: torch.Tensor) -> bool:
    """Whether :func:`linear` / :func:`matmul` on ``t`` multiply as fp32: :func:`emulated_low_precision`, no gradients."""
    return emulated_low_precision(t) and not torch.is_grad_enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; see the module docstring for bf16 on a CPU without bf16 arithmetic."""
    if upcasts(weight):
        return F.linear(x.float(), weight.float(), bias.float() if bias is not None else None).to(weight.dtype)
    return F.linear(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)``; see the module docstring for bf16 on a CPU without bf16 arithmetic."""
    if upcasts(a):
        return torch.matmul(a.float(), b.float()).to(a.dtype)
    return torch.matmul(a, b)
