"""Triton kernels for the MoE hot path, same contracts as :mod:`moe.kernels.reference`.

* ``_topk_routing_kernel``: one program per token: scores (softmax / sigmoid), biased
  selection by ``k`` rounds of arg-max, gathered and renormalised weights.
  Group-limited routing uses the reference (rare, small).
* ``_gather_rows_kernel``: ``out[i] = scale[i] * src[index[i]]`` (permute; and the
  unpermute backward with the routing weight fused).
* ``_combine_kernel``: ``y[t] = sum_a w[t, a] * rows[row(t, a)]`` with dropped slots
  skipped: unpermute with the weights fused, as a gather (no atomics, deterministic).
* ``_grouped_mm_kernel``: per (expert, row tile, column tile) ``x[rows of e] @ w[e]``.

Backward passes reuse these kernels where the math is another gather / GEMM; the
routing-weight gradients and the grouped weight gradient use the torch reference.
On CPU these run only under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe.kernels import reference
from moe.kernels.reference import combine_rows, sort_slots, swiglu  # noqa: F401  (same ops for both backends)


@triton.jit
def _topk_routing_kernel(
    logits_ptr, bias_ptr, scores_ptr, weights_ptr, experts_ptr,
    E, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    logits = tl.load(logits_ptr + t * E + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        shifted = tl.exp(logits - tl.max(logits, axis=0))
        scores = shifted / tl.sum(shifted, axis=0)
    scores = tl.where(mask, scores, 0.0)
    tl.store(scores_ptr + t * E + cols, scores, mask=mask)
    select = scores
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + cols, mask=mask, other=0.0)
    select = tl.where(mask, select, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    w_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    e_vec = tl.zeros([BLOCK_K], dtype=tl.int64)
    for a in tl.static_range(K):
        best = tl.argmax(select, axis=0)
        w = tl.sum(tl.where(cols == best, scores, 0.0), axis=0)
        w_vec = tl.where(slots == a, w, w_vec)
        e_vec = tl.where(slots == a, best.to(tl.int64), e_vec)
        select = tl.where(cols == best, float("-inf"), select)
    if NORM:
        w_vec = w_vec / tl.sum(w_vec, axis=0)
    tl.store(weights_ptr + t * K + slots, w_vec, mask=slots < K)
    tl.store(experts_ptr + t * K + slots, e_vec, mask=slots < K)


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, scale_ptr, out_ptr, H, HAS_SCALE: tl.constexpr, BLOCK_H: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    src_row = tl.load(index_ptr + i)
    v = tl.load(src_ptr + src_row * H + cols, mask=mask, other=0.0)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + i)
    tl.store(out_ptr + i * H + cols, v, mask=mask)


@triton.jit
def _combine_kernel(rows_ptr, row_of_slot_ptr, weights_ptr, out_ptr, H, A: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for a in tl.static_range(A):
        row = tl.load(row_of_slot_ptr + t * A + a)
        w = tl.load(weights_ptr + t * A + a).to(tl.float32)
        v = tl.load(rows_ptr + tl.maximum(row, 0) * H + cols, mask=mask, other=0.0)
        acc += tl.where(row >= 0, w * v.to(tl.float32), 0.0)  # dropped slot: row -1 contributes nothing
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, starts_ptr, counts_ptr, K, O,
    stride_xn, stride_xk, stride_we, stride_wk, stride_wo, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    tile_m = tl.program_id(1)
    count = tl.load(counts_ptr + e)
    if tile_m * BLOCK_M < count:
        start = tl.load(starts_ptr + e)
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + (start + rows)[:, None] * stride_xn + ks[None, :] * stride_xk,
                        mask=(rows[:, None] < count) & (ks[None, :] < K), other=0.0)
            w = tl.load(w_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wo,
                        mask=(ks[:, None] < K) & (cols[None, :] < O), other=0.0)
            acc += tl.dot(x, w, input_precision="ieee")
        tl.store(out_ptr + (start + rows)[:, None] * stride_on + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < count) & (cols[None, :] < O))


def _block(n: int, cap: int = 1024) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


# ----------------------------------------------------------------------------- routing


def _routing_forward(logits_TE: torch.Tensor, top_k: int, score_function: str, norm: bool, bias_E: Optional[torch.Tensor]) -> tuple:
    T, E = logits_TE.shape
    logits_TE = logits_TE.float().contiguous()
    scores = torch.empty_like(logits_TE)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
    experts = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    if T:
        bias = bias_E.float().contiguous() if bias_E is not None else logits_TE
        _topk_routing_kernel[(T,)](
            logits_TE, bias, scores, weights, experts, E, K=top_k, BLOCK_K=_block(top_k), BLOCK_E=_block(E, 1 << 16),
            SIGMOID=score_function == "sigmoid", HAS_BIAS=bias_E is not None, NORM=norm,
        )
    return weights, experts, scores


def topk_routing(
    logits_TE: torch.Tensor,
    top_k: int,
    score_function: str = "softmax",
    norm_topk_prob: bool = True,
    expert_bias_E: Optional[torch.Tensor] = None,
    num_groups: int = 1,
    top_groups: int = 1,
) -> tuple:
    """Same contract as :func:`moe.kernels.reference.topk_routing`.

    The kernel picks the experts and the weights; the differentiable weights and scores
    are recomputed from the chosen experts in torch so gradients flow to the logits.
    """
    if num_groups > 1:
        return reference.topk_routing(logits_TE, top_k, score_function, norm_topk_prob, expert_bias_E, num_groups, top_groups)
    if score_function not in ("softmax", "sigmoid"):
        raise ValueError(f"score_function={score_function!r}: must be 'softmax' or 'sigmoid'")
    with torch.no_grad():
        weights, experts, scores = _routing_forward(logits_TE, top_k, score_function, norm_topk_prob, expert_bias_E)
    if not (torch.is_grad_enabled() and logits_TE.requires_grad):
        return weights, experts, scores
    scores = reference.compute_scores(logits_TE, score_function)
    weights = scores.gather(1, experts)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, scores


# ----------------------------------------------------------------------------- permute / unpermute


def _gather_rows(src: torch.Tensor, index: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    src = src.contiguous()
    H = src.shape[1]
    out = src.new_empty(index.numel(), H)
    if index.numel():
        BLOCK_H = _block(H)
        _gather_rows_kernel[(index.numel(), triton.cdiv(H, BLOCK_H))](
            src, index.contiguous(), scale.contiguous() if scale is not None else src, out, H, HAS_SCALE=scale is not None, BLOCK_H=BLOCK_H
        )
    return out


def _combine(rows: torch.Tensor, row_of_slot_TA: torch.Tensor, weights_TA: torch.Tensor) -> torch.Tensor:
    T, A = row_of_slot_TA.shape
    H = rows.shape[1]
    out = rows.new_empty(T, H)
    if T:
        BLOCK_H = _block(H)
        _combine_kernel[(T, triton.cdiv(H, BLOCK_H))](
            rows.contiguous() if rows.numel() else out, row_of_slot_TA.contiguous(), weights_TA.contiguous(), out, H, A=A, BLOCK_H=BLOCK_H
        )
    return out


def _row_of_slot(slots_N: torch.Tensor, T: int, A: int) -> torch.Tensor:
    """``[T, A]``: the row holding each slot, -1 where the slot was not kept."""
    row = torch.full((T * A,), -1, dtype=torch.int64, device=slots_N.device)
    row[slots_N] = torch.arange(slots_N.numel(), device=slots_N.device)
    return row.view(T, A)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, slots_N, top_k):
        ctx.save_for_backward(slots_N)
        ctx.T, ctx.top_k = x_TH.shape[0], top_k
        return _gather_rows(x_TH, torch.div(slots_N, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_NH):
        (slots_N,) = ctx.saved_tensors
        ones = torch.ones(ctx.T, ctx.top_k, dtype=torch.float32, device=grad_NH.device)
        return _combine(grad_NH, _row_of_slot(slots_N, ctx.T, ctx.top_k), ones), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_NH, slots_N, weights_TA):
        ctx.save_for_backward(rows_NH, slots_N, weights_TA)
        T, A = weights_TA.shape
        return _combine(rows_NH, _row_of_slot(slots_N, T, A), weights_TA)

    @staticmethod
    def backward(ctx, grad_TH):
        rows_NH, slots_N, weights_TA = ctx.saved_tensors
        A = weights_TA.shape[1]
        tokens_N = torch.div(slots_N, A, rounding_mode="floor")
        w_N = weights_TA.reshape(-1).index_select(0, slots_N).float()
        d_rows = _gather_rows(grad_TH, tokens_N, w_N)
        d_w = torch.zeros(weights_TA.numel(), dtype=torch.float32, device=grad_TH.device)
        d_w[slots_N] = (grad_TH.index_select(0, tokens_N).float() * rows_NH.float()).sum(1)
        return d_rows, None, d_w.view_as(weights_TA).to(weights_TA.dtype)


def permute(x_TH: torch.Tensor, slots_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows for the experts: ``out[i] = x[slots[i] // top_k]``."""
    return _Permute.apply(x_TH, slots_N, top_k)


def unpermute(rows_NH: torch.Tensor, slots_N: torch.Tensor, weights_TA: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum over kept slots (t, a) of weights[t, a] * rows[i(t, a)]``; fp32 accumulation."""
    return _Unpermute.apply(rows_NH, slots_N, weights_TA)


# ----------------------------------------------------------------------------- grouped GEMM


def _grouped_mm_forward(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    N, K = x_NK.shape
    E, _, O = w_EKO.shape
    out = x_NK.new_empty(N, O)
    if N == 0:
        return out
    starts = (torch.cumsum(counts_E, 0) - counts_E).contiguous()
    longest = int(counts_E.max())
    BLOCK_M, BLOCK_N, BLOCK_K = 32, _block(O, 64), _block(K, 32)
    BLOCK_N, BLOCK_K = max(BLOCK_N, 16), max(BLOCK_K, 16)  # tl.dot needs tiles of at least 16
    grid = (E, triton.cdiv(longest, BLOCK_M), triton.cdiv(O, BLOCK_N))
    _grouped_mm_kernel[grid](
        x_NK, w_EKO, out, starts, counts_E.contiguous(), K, O,
        x_NK.stride(0), x_NK.stride(1), w_EKO.stride(0), w_EKO.stride(1), w_EKO.stride(2), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out


class _TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NK, w_EKO, counts_E):
        ctx.save_for_backward(x_NK, w_EKO, counts_E)
        return _grouped_mm_forward(x_NK, w_EKO, counts_E)

    @staticmethod
    def backward(ctx, grad_NO):
        x_NK, w_EKO, counts_E = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        dx = _grouped_mm_forward(grad_NO, w_EKO.transpose(1, 2), counts_E) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                w = w_EKO.detach().requires_grad_(True)
                (dw,) = torch.autograd.grad(reference.grouped_mm(x_NK.detach(), w, counts_E), w, grad_NO)
        return dx, dw, None


def grouped_mm(x_NK: torch.Tensor, w_EKO: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]``; rows sorted by expert, ``sum(counts) == N``."""
    if x_NK.shape[0] == 0:
        return x_NK @ w_EKO[0]  # keeps x and w in the graph (see the reference)
    return _TritonGroupedMM.apply(x_NK, w_EKO, tokens_per_expert_E)
