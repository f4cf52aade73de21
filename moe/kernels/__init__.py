"""MoE kernels: Triton implementations and their torch references, chosen at run time.

Every op has a torch reference in :mod:`moe.kernels.reference` with the exact semantics
the Triton version (:mod:`moe.kernels.triton_ops`) is tested against. ``kernel_backend``
``auto`` picks Triton on CUDA tensors when triton imports, torch otherwise; ``torch`` /
``triton`` force one (``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1``).
``inductor`` (:mod:`moe.kernels.inductor`) is the torch reference with the SwiGLU compiled
by TorchInductor: the fastest choice on CPU for runs long enough to repay the compile at
start (it needs a C++ compiler), never picked by ``auto``.
"""
from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from megatron_seed.config import ConfigError

BACKENDS = ("auto", "torch", "triton", "inductor")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """``torch``, ``triton`` or ``inductor`` for tensors on ``device``."""
    if name not in BACKENDS:
        raise ConfigError(f"model.moe.kernel_backend={name!r}: must be one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ConfigError("model.moe.kernel_backend='triton' but triton is not installed; fix: pip install triton or use 'torch'")
    return name


def ops(backend: str) -> ModuleType:
    """The module implementing ``topk_routing``, ``sort_slots``, ``permute``, ``unpermute``,
    ``combine_rows``, ``grouped_mm`` and ``swiglu``."""
    if backend == "triton":
        from moe.kernels import triton_ops

        return triton_ops
    if backend == "inductor":
        from moe.kernels import inductor

        return inductor
    from moe.kernels import reference

    return reference
