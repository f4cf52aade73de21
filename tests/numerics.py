"""Comparing computed tensors with a tolerance that follows fp32 rounding.

The rounding error of an fp32 sum (a matmul, a reduction, a gradient) scales with the
magnitude of its summands, not with the result: an element that is small because terms
cancel carries the absolute error of the large terms. How large that error is depends on
the order of the sum, which differs between CPUs (BLAS kernel, vector width, thread
count). An element-wise check (``|a - e| <= atol + rtol |e|``) therefore fails on some
machine for any atol below that error, however right the code is. The tests compare the
norm instead, in float64:

    rel_err(a, e) = ||a - e||_2 / ||e||_2

Correct fp32 code stays near 1e-7 on any machine; the project's rule "parallel equals
serial in fp32" is ``rel_err <= 1e-5``.
"""
from __future__ import annotations

import numpy as np
import torch

Array = torch.Tensor | np.ndarray | float | list


def _as_float64(x: Array) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def rel_err(actual: Array, expected: Array) -> float:
    """``||actual - expected|| / ||expected||`` in float64; 0 for two empty tensors.

    An all-zero ``expected`` gives 0 only when ``actual`` is all zero too (else inf); a NaN
    anywhere gives NaN, which fails every ``<=`` check.
    """
    a, e = _as_float64(actual), _as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    diff, norm = float((a - e).norm()), float(e.norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def assert_close_rel(actual: Array, expected: Array, rtol: float = 1e-5, what: str = "") -> None:
    """Fail unless ``rel_err(actual, expected) <= rtol``, naming ``what`` and the error."""
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what + ': ' if what else ''}relative error {err:.3e} (of the norm) > {rtol:.0e}"
