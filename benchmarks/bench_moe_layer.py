"""MoE layer forward+backward: ours vs HF Qwen3MoeSparseMoeBlock vs the dense-matmul floor.

All three run side by side in one process, single thread, same weights and input:

* ours: :class:`moe.layer.MoELayer` (one process, aux losses off as HF's block computes
  none), once per ``--backends`` entry: ``torch`` (eager reference kernels) and ``inductor``
  (the SwiGLU compiled by TorchInductor; compiled before timing);
* HF: ``transformers``' ``Qwen3MoeSparseMoeBlock`` with the weights copied;
* floor: the same matmul FLOPs as dense GEMMs, forward and backward: router
  ``[T, H] x [H, E]``, gate/up ``[T*A, H] x [H, 2F]``, down ``[T*A, F] x [F, H]``.

Timed round-robin (noise on a shared machine hits all three alike). The process runs with
the stack's host-allocator setting (:mod:`megatron_seed.host_allocator`, as the
``megatron-seed`` command does) unless ``--glibc-malloc-defaults``; it applies to all three. Prints the median time of each and the ratios HF/ours (target >= 1.3) and ours/floor
(target <= 1.5) for each backend. ``--device cuda`` runs all three on the GPU (``triton`` then
joins the backends; ``benchmarks/gpu_check.sh`` runs it so). Usage:
``python benchmarks/bench_moe_layer.py [--repeats 15] [--backends torch inductor] [--device cpu] [--glibc-malloc-defaults]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_seed.config import ModelConfig, MoEConfig  # noqa: E402
from megatron_seed.host_allocator import keep_freed_memory_in_heap  # noqa: E402
from megatron_seed.parallel.sharding import init_parameters  # noqa: E402
from megatron_seed.parallel.state import ParallelState  # noqa: E402
from moe.layer import MoELayer  # noqa: E402

SHAPES = [  # tokens, hidden, expert ffn, experts, top-k
    (1024, 256, 128, 16, 4),
    (2048, 512, 256, 64, 8),
]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a CUDA call returns before its work is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: list, repeats: int, device: torch.device, warmup: int = 2) -> list:
    """Median seconds of each function, timed round-robin so machine noise hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def build(T: int, H: int, F: int, E: int, A: int, backends: list, device: torch.device) -> tuple:
    """``([our layer per backend], HF block)``, all with the same weights, on ``device``."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    ps = ParallelState.single(device=str(device))
    ours = []
    for backend in backends:
        layer = MoELayer(ModelConfig(hidden_size=H, moe=MoEConfig(num_experts=E, top_k=A, ffn_size=F, aux_loss_coef=0.0, kernel_backend=backend)), ps)
        init_parameters(layer, 0, ps, 0.02)
        ours.append(layer)
    hf = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=A, norm_topk_prob=True))
    with torch.no_grad():
        hf.gate.weight.copy_(ours[0].router.weight)
        hf.experts.gate_up_proj.copy_(ours[0].experts.w_gate_up.reshape(E, 2 * F, H))
        hf.experts.down_proj.copy_(ours[0].experts.w_down)
    return [layer.to(device) for layer in ours], hf.to(device)


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    def step() -> None:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        module(xi).backward(g)

    return step


def floor_step(T: int, H: int, F: int, E: int, A: int, device: torch.device):
    """Dense GEMMs with the MoE layer's matmul FLOPs, forward and backward, on ``device``."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    x, rows, w_router = randn(T, H), randn(T * A, H), randn(H, E)
    w_gate_up, w_down = randn(H, 2 * F), randn(F, H)
    g_router, g_up, g_down = randn(T, E, grad=False), randn(T * A, 2 * F, grad=False), randn(T * A, H, grad=False)
    h = randn(T * A, F)

    leaves = (x, rows, w_router, w_gate_up, w_down, h)

    def step() -> None:
        for t in leaves:  # fresh gradients each step, like the layer's zero_grad(set_to_none=True)
            t.grad = None
        torch.autograd.backward([x @ w_router, rows @ w_gate_up, h @ w_down], [g_router, g_up, g_down])

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backends", nargs="+", choices=["torch", "inductor", "triton"],
                        help="our kernel backends to time (default: torch inductor, plus triton on cuda)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the three run")
    parser.add_argument("--glibc-malloc-defaults", action="store_true", help="leave glibc's mmap/trim thresholds as they are")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.backends = args.backends or ["torch", "inductor"] + (["triton"] if device.type == "cuda" else [])
    heap = "glibc defaults" if args.glibc_malloc_defaults or not keep_freed_memory_in_heap() else "freed memory kept in the heap"
    torch.set_num_threads(1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu, 1 thread"
    print(f"torch {torch.__version__}, {where}, median of {args.repeats} repeats, forward+backward, host allocator: {heap}")
    print(f"{'T':>5} {'H':>4} {'F':>4} {'E':>3} {'A':>2} {'backend':>8} | {'ours ms':>8} {'HF ms':>8} {'floor ms':>8} | {'HF/ours':>7} {'ours/floor':>10}")
    met = dict.fromkeys(args.backends, True)
    for T, H, F, E, A in SHAPES:
        torch.manual_seed(0)
        ours, hf = build(T, H, F, E, A, args.backends, device)
        x, g = torch.randn(1, T, H, device=device), torch.randn(1, T, H, device=device)
        for layer in ours:
            with torch.no_grad():
                torch.testing.assert_close(layer(x), hf(x), rtol=1e-4, atol=1e-5)  # same work, same answer
            fwd_bwd(layer, x, g)()  # the inductor backend compiles here, not inside the timing
        steps = [fwd_bwd(layer, x, g) for layer in ours] + [fwd_bwd(hf, x, g), floor_step(T, H, F, E, A, device)]
        *t_ours, t_hf, t_floor = interleaved_medians(steps, args.repeats, device)
        for backend, t in zip(args.backends, t_ours):
            speedup, overhead = t_hf / t, t / t_floor
            met[backend] &= speedup >= 1.3 and overhead <= 1.5
            print(f"{T:>5} {H:>4} {F:>4} {E:>3} {A:>2} {backend:>8} | {t * 1e3:8.2f} {t_hf * 1e3:8.2f} {t_floor * 1e3:8.2f} | {speedup:7.2f} {overhead:10.2f}")
    for backend, ok in met.items():
        print(f"targets (HF/ours >= 1.3, ours/floor <= 1.5) with kernel_backend={backend}:", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
