"""Triton MoE kernels vs their torch references on GPU: achieved GB/s or TFLOP/s.

Times, side by side on the same inputs, top-k routing, permute, unpermute (weights fused)
and the grouped GEMM (forward). On a machine without CUDA it says so and exits 0.
Usage: ``python benchmarks/bench_moe_kernels.py [--tokens 8192 --hidden 2048 --ffn 1024 --experts 64 --top-k 8]``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cuda_time(fn, repeats: int = 20) -> float:
    """Median seconds per call, measured with CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_moe_kernels: needs a CUDA GPU (the Triton kernels are tested on CPU under TRITON_INTERPRET=1); skipping")
        return 0
    from moe.kernels import reference as ref
    from moe.kernels import triton_ops as tri

    T, H, F, E, A = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
    dev = torch.device("cuda")
    torch.manual_seed(0)
    logits = torch.randn(T, E, device=dev)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    _, experts, _ = ref.topk_routing(logits, A)
    weights = torch.rand(T, A, device=dev)
    slots, counts = ref.sort_slots(experts, E)
    rows = ref.permute(x, slots, A)
    w = torch.randn(E, H, 2 * F, device=dev, dtype=torch.bfloat16) * 0.02
    moved = 2 * T * A * H * x.element_size()  # read + write of every routed row
    gemm_flops = 2 * T * A * H * 2 * F
    cases = [
        ("topk_routing", lambda: tri.topk_routing(logits, A), lambda: ref.topk_routing(logits, A), "GB/s", T * E * 4 + T * A * 12),
        ("permute", lambda: tri.permute(x, slots, A), lambda: ref.permute(x, slots, A), "GB/s", moved),
        ("unpermute", lambda: tri.unpermute(rows, slots, weights), lambda: ref.unpermute(rows, slots, weights), "GB/s", moved),
        ("grouped_mm", lambda: tri.grouped_mm(rows, w, counts), lambda: ref.grouped_mm(rows, w, counts), "TFLOP/s", gemm_flops),
    ]
    print(f"{torch.cuda.get_device_name()}: T={T} H={H} F={F} E={E} top-k={A}, bf16 activations")
    print(f"{'kernel':<14} {'triton ms':>10} {'torch ms':>10} {'triton':>10} {'torch':>10} {'unit':>8} {'speedup':>8}")
    with torch.no_grad():
        for name, fast, slow, unit, work in cases:
            t_tri, t_ref = cuda_time(fast), cuda_time(slow)
            scale = 1e9 if unit == "GB/s" else 1e12
            print(f"{name:<14} {t_tri * 1e3:10.3f} {t_ref * 1e3:10.3f} {work / t_tri / scale:10.1f} {work / t_ref / scale:10.1f} {unit:>8} {t_ref / t_tri:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
