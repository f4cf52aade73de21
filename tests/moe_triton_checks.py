"""Triton kernels vs their torch references; run as a script under TRITON_INTERPRET=1 on CPU,
or with MOE_CHECK_DEVICE=cuda on a GPU (``benchmarks/gpu_check.sh``).

``tests/test_moe_kernels.py`` runs this file in a subprocess so the interpreter flag is
set before triton is imported and no other test is affected. Sizes are tiny and odd
(non-powers of two), with empty experts and dropped slots.
"""
from __future__ import annotations

import os
import sys

DEVICE = os.environ.get("MOE_CHECK_DEVICE", "cpu")
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see tests/test_moe_kernels.py)"

import torch  # noqa: E402

torch.set_default_device(DEVICE)

from moe.kernels import reference as ref  # noqa: E402
from moe.kernels import triton_ops as tri  # noqa: E402
from tests.numerics import assert_close_rel  # noqa: E402


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert_close_rel(a, b, 1e-5, what)


def check_routing() -> None:
    torch.manual_seed(0)
    for T, E, k, fn, norm, bias in [(7, 5, 2, "softmax", True, False), (6, 11, 3, "sigmoid", True, True), (5, 6, 1, "softmax", False, True)]:
        logits = torch.randn(T, E, requires_grad=True)
        b = torch.randn(E) if bias else None
        w_t, e_t, s_t = tri.topk_routing(logits, k, fn, norm, b)
        w_r, e_r, s_r = ref.topk_routing(logits, k, fn, norm, b)
        assert torch.equal(e_t, e_r), (fn, e_t, e_r)
        close(w_t, w_r, f"routing weights {fn}")
        close(s_t, s_r, f"routing scores {fn}")
        with torch.no_grad():  # the kernel's own outputs (no recompute)
            w_k, e_k, s_k = tri.topk_routing(logits, k, fn, norm, b)
        assert torch.equal(e_k, e_r)
        close(w_k, w_r.detach(), "kernel weights")
        close(s_k, s_r.detach(), "kernel scores")
        g = torch.randn(T, k)
        (gt,) = torch.autograd.grad((w_t * g).sum(), logits)
        (gr,) = torch.autograd.grad((w_r * g).sum(), logits)
        close(gt, gr, "routing grad")


def check_permute_unpermute() -> None:
    torch.manual_seed(1)
    T, A, E, H = 9, 3, 6, 13
    experts = torch.randint(0, E - 2, (T, A))  # experts E-2, E-1 stay empty
    experts[0, 1] = E  # a dropped slot
    slots, counts = ref.sort_slots(experts, E)
    assert counts[-2:].sum() == 0
    x = torch.randn(T, H, requires_grad=True)
    weights = torch.rand(T, A, requires_grad=True)
    outs = {}
    for name, impl in (("ref", ref), ("tri", tri)):
        rows = impl.permute(x, slots, A)
        y = impl.unpermute(rows * 1.5, slots, weights)
        g = torch.linspace(-1, 1, T * H).view(T, H)
        dx, dw = torch.autograd.grad((y * g).sum(), (x, weights))
        outs[name] = (rows, y, dx, dw)
    for i, what in enumerate(("permute", "unpermute", "permute grad", "weights grad")):
        close(outs["tri"][i], outs["ref"][i], what)


def check_grouped_mm() -> None:
    torch.manual_seed(2)
    for counts, K, O in [([3, 0, 37, 1, 0], 19, 23), ([0, 0, 5], 16, 16), ([40], 7, 33)]:
        counts = torch.tensor(counts)
        x = torch.randn(int(counts.sum()), K, requires_grad=True)
        w = torch.randn(len(counts), O, K).transpose(1, 2).requires_grad_(False)  # transposed view, as the experts pass it
        w = w.detach().requires_grad_(True)
        g = torch.randn(int(counts.sum()), O)
        yt, yr = tri.grouped_mm(x, w, counts), ref.grouped_mm(x, w, counts)
        close(yt, yr, f"grouped_mm {counts.tolist()}")
        gt = torch.autograd.grad((yt * g).sum(), (x, w))
        gr = torch.autograd.grad((yr * g).sum(), (x, w))
        close(gt[0], gr[0], "grouped_mm dx")
        close(gt[1], gr[1], "grouped_mm dw")


if __name__ == "__main__":
    checks = {"routing": check_routing, "permute": check_permute_unpermute, "grouped_mm": check_grouped_mm}
    for name in sys.argv[1:] or checks:
        checks[name]()
        print(f"ok {name}")
