"""Torch reference implementations of the MoE kernels (the semantics the Triton kernels match).

Shapes: ``T`` tokens, ``H`` hidden, ``E`` experts, ``A`` top-k slots per token, ``N``
routed rows (kept token-slots, sorted by expert), ``K``/``O`` GEMM in/out features.

* :func:`topk_routing`: scores (softmax or sigmoid in fp32), optional selection bias and
  group limiting, top-k, optional renormalisation.
* :func:`permute`: token-slots sorted by expert (stable), rows gathered.
* :func:`unpermute`: ``y[t] = sum_a probs[t, a] * rows[slot(t, a)]`` (weights fused).
* :func:`combine_rows`: ``y[t] = sum_a rows[slot(t, a)]``, the adjoint of :func:`permute`
  (used when the routing weights were already applied in :func:`swiglu`).
* :func:`grouped_mm`: ``out[rows of expert e] = x[rows of e] @ w[e]`` for contiguous segments.
* :func:`swiglu`: ``w_row * silu(gate) * up`` on the fused gate/up GEMM output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_seed.gemm import emulated_low_precision


def compute_scores(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """Routing scores in fp32: ``softmax`` over all experts or element-wise ``sigmoid``."""
    logits_TE = logits_TE.float()
    if score_function == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"score_function={score_function!r}: must be 'softmax' or 'sigmoid'")


def select_experts(scores_TE: torch.Tensor, top_k: int, num_groups: int = 1, top_groups: int = 1) -> torch.Tensor:
    """Indices ``[T, A]`` of the top-k experts by ``scores_TE`` (no gradient).

    Group-limited (``num_groups > 1``): experts form ``num_groups`` contiguous groups; a
    group's score is the sum of its best ``top_k // top_groups`` scores (Megatron-core /
    DeepSeek-V3); only experts in the best ``top_groups`` groups are eligible.
    """
    if num_groups > 1:
        T, E = scores_TE.shape
        per_group = max(top_k // top_groups, 1)
        group_scores_TG = scores_TE.view(T, num_groups, E // num_groups).topk(per_group, dim=-1).values.sum(-1)
        best_groups = group_scores_TG.topk(top_groups, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups, True)
        expert_mask_TE = group_mask_TG.repeat_interleave(E // num_groups, dim=1)
        scores_TE = scores_TE.masked_fill(~expert_mask_TE, float("-inf"))
    return scores_TE.topk(top_k, dim=-1).indices


def topk_routing(
    logits_TE: torch.Tensor,
    top_k: int,
    score_function: str = "softmax",
    norm_topk_prob: bool = True,
    expert_bias_E: Optional[torch.Tensor] = None,
    num_groups: int = 1,
    top_groups: int = 1,
) -> tuple:
    """Route tokens: returns ``(weights_TA fp32, experts_TA int64, scores_TE fp32)``.

    ``scores = softmax(logits)`` or ``sigmoid(logits)``; experts are chosen by
    ``scores + expert_bias`` (the bias steers selection only, DeepSeek-V3); weights are the
    chosen unbiased scores, divided by their sum when ``norm_topk_prob``.
    """
    scores_TE = compute_scores(logits_TE, score_function)
    with torch.no_grad():
        select_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E.float()
        experts_TA = select_experts(select_TE, top_k, num_groups, top_groups)
    weights_TA = scores_TE.gather(1, experts_TA)
    if norm_topk_prob:
        weights_TA = weights_TA / weights_TA.sum(dim=-1, keepdim=True)
    return weights_TA, experts_TA, scores_TE


def expert_counts(experts_TA: torch.Tensor, num_experts: int, valid_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Slots routed to each expert, ``[E]`` int64, counting only tokens with ``valid_T`` True when given.

    A scatter-add into ``[E]``: unlike ``bincount`` (output size = largest id + 1) or a boolean
    index, its shapes do not depend on the data, so ``torch.compile`` traces it and a GPU never
    waits on the host. Every id must be ``< num_experts``.
    """
    ones_TA = torch.ones_like(experts_TA) if valid_T is None else valid_T.to(experts_TA.dtype).unsqueeze(1).expand_as(experts_TA)
    return experts_TA.new_zeros(num_experts).scatter_add_(0, experts_TA.reshape(-1), ones_TA.reshape(-1))


def sort_slots(experts_TA: torch.Tensor, num_experts: int, droppable: bool = True) -> tuple:
    """``(slots_N, tokens_per_expert_E)``: kept slot ids (``t * A + a``) sorted by expert.

    Slots whose expert id is ``>= num_experts`` (dropped by capacity, or owned by another
    rank) are left out. The sort is stable, so within an expert slots keep token order.
    ``droppable=False`` promises no such id: every slot is kept without the host sync that
    sizing the kept set needs, and every shape is fixed (torch.compile traces it whole).
    """
    flat = experts_TA.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    if not droppable:
        return order, expert_counts(experts_TA, num_experts)
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)
    tokens_per_expert_E = counts[:num_experts]
    return order[: int(tokens_per_expert_E.sum())], tokens_per_expert_E


def permute(x_TH: torch.Tensor, slots_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows for the experts: ``out[i] = x[slots[i] // top_k]``."""
    return x_TH.index_select(0, torch.div(slots_N, top_k, rounding_mode="floor"))


def unpermute(rows_NH: torch.Tensor, slots_N: torch.Tensor, weights_TA: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum over kept slots (t, a) of weights[t, a] * rows[i(t, a)]``.

    When every slot is kept (dropless, one rank) this is one batched ``[1, A] x [A, H]``
    product per token; otherwise a weighted ``index_add`` (fp32 accumulation).
    """
    T, A = weights_TA.shape
    if slots_N.numel() == T * A:
        row_of_slot = torch.empty_like(slots_N)
        row_of_slot[slots_N] = torch.arange(slots_N.numel(), device=slots_N.device)
        rows_TAH = rows_NH.index_select(0, row_of_slot).view(T, A, -1)
        return torch.bmm(weights_TA.to(rows_NH.dtype).unsqueeze(1), rows_TAH).squeeze(1)
    w_N = weights_TA.reshape(-1).index_select(0, slots_N)
    weighted = rows_NH.float() * w_N.float().unsqueeze(1)
    out = weighted.new_zeros(T, rows_NH.shape[1]).index_add(0, torch.div(slots_N, A, rounding_mode="floor"), weighted)
    return out.to(rows_NH.dtype)


def combine_rows(rows_NH: torch.Tensor, slots_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """``y[t] = sum over kept slots (t, a) of rows[i(t, a)]`` (fp32 accumulation), ``y`` is ``[T, H]``.

    One ``index_add`` into ``[T, H]``; its backward is one row gather, so expert outputs
    are never copied into a ``[T, A, H]`` buffer.
    """
    tokens_N = torch.div(slots_N, top_k, rounding_mode="floor")
    out = torch.zeros(num_tokens, rows_NH.shape[1], dtype=torch.float32, device=rows_NH.device)
    return out.index_add_(0, tokens_N, rows_NH.float()).to(rows_NH.dtype)


def _swiglu_forward(gate_up_N2F: torch.Tensor, weights_N: Optional[torch.Tensor]) -> torch.Tensor:
    F_ = gate_up_N2F.shape[1] // 2
    out = F.silu(gate_up_N2F[:, :F_]).mul_(gate_up_N2F[:, F_:])
    return out if weights_N is None else out.mul_(weights_N.unsqueeze(1))


def _swiglu_backward(grad_NF: torch.Tensor, gate_up_N2F: torch.Tensor, weights_N: Optional[torch.Tensor], need_d_weights: bool) -> tuple:
    """``(d_gate_up [N, 2F], d_weights [N] or None)`` of :func:`_swiglu_forward`.

    Few passes, written in place into the one ``[N, 2F]`` output: on CPU each pass and each
    fresh buffer costs memory traffic (and page faults), and aten's fused ``silu_backward``
    does ``d silu(x)/dx = sig(x) * (1 + x * (1 - sig(x)))`` in one pass.
    """
    gate, up = gate_up_N2F.chunk(2, dim=1)
    out = torch.empty_like(gate_up_N2F)
    d_gate, d_up = out.chunk(2, dim=1)
    torch.mul(grad_NF, F.silu(gate), out=d_up)  # g * silu(gate), weighted below
    d_weights = None
    if weights_N is not None and need_d_weights:
        # sum_f g * silu(gate) * up as one batched [1, F] x [F, 1] product per row
        d_weights = torch.bmm(d_up.unsqueeze(1), up.unsqueeze(2)).view(-1)
    torch.mul(grad_NF, up, out=d_gate)
    if weights_N is not None:
        d_up.mul_(weights_N.unsqueeze(1))
        d_gate.mul_(weights_N.unsqueeze(1))
    torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
    return out, d_weights


@dataclass(frozen=True)
class SwiGLUImpl:
    """A backend's SwiGLU: ``forward(gate_up, weights)`` and
    ``backward(grad, gate_up, weights, need_d_weights) -> (d_gate_up, d_weights)``."""

    forward: Callable
    backward: Callable


EAGER_SWIGLU = SwiGLUImpl(_swiglu_forward, _swiglu_backward)


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd must record this op (inference skips the autograd.Function's overhead)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _SwiGLU(torch.autograd.Function):
    """``w[:, None] * silu(gate) * up`` on a fused ``[N, 2F]`` input (``w`` optional).

    Applying the routing weight here, on ``[N, F]``, instead of on the ``[N, H]`` expert
    output is the same product (the down projection is linear) at half the memory traffic
    when ``F <= H``, and its gradient ``dw = sum_f g * silu(gate) * up`` comes for free.
    The backward writes one fused ``[N, 2F]`` gradient.
    """

    @staticmethod
    def forward(ctx, gate_up_N2F, weights_N, impl):
        ctx.save_for_backward(gate_up_N2F, weights_N)
        ctx.impl = impl
        return impl.forward(gate_up_N2F, weights_N)

    @staticmethod
    def backward(ctx, grad_NF):
        gate_up, weights_N = ctx.saved_tensors
        d_gate_up, d_weights = ctx.impl.backward(grad_NF, gate_up, weights_N, ctx.needs_input_grad[1])
        return d_gate_up, d_weights, None


def swiglu(gate_up_N2F: torch.Tensor, weights_N: Optional[torch.Tensor] = None, impl: SwiGLUImpl = EAGER_SWIGLU) -> torch.Tensor:
    """``w[:, None] * silu(x[:, :F]) * x[:, F:]`` (``w`` = per-row routing weight, or 1)."""
    if weights_N is not None:
        weights_N = weights_N.to(gate_up_N2F.dtype)
    if _needs_grad(gate_up_N2F, weights_N):
        return _SwiGLU.apply(gate_up_N2F, weights_N, impl)
    return impl.forward(gate_up_N2F, weights_N)


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm needs every non-unit stride to be a multiple of 16 bytes."""
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())


def _segment_mm_padded(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM by padding each segment to the longest and one ``bmm`` (any sizes)."""
    E = w_EKO.shape[0]
    N = x_NK.shape[0]
    longest = int(counts_E.max()) if E else 0
    starts = torch.cumsum(counts_E, 0) - counts_E
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_NK.device), counts_E, output_size=N)
    pos_N = torch.arange(N, device=x_NK.device) - starts[expert_N]
    padded = x_NK.new_zeros(E, longest, x_NK.shape[1]).index_put((expert_N, pos_N), x_NK)
    return torch.bmm(padded, w_EKO)[expert_N, pos_N]


def _transposed_copy(a_NK: torch.Tensor) -> torch.Tensor:
    """Row-major ``a^T [K, N']`` with ``N'`` padded to 16 bytes (rows past ``N`` are never read)."""
    N, K = a_NK.shape
    pad = -N % max(16 // a_NK.element_size(), 1)
    out = a_NK.new_empty(K, N + pad)
    out[:, :N] = a_NK.t()
    return out


class _GroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` with a backward that accepts any incoming gradient layout."""

    @staticmethod
    def forward(ctx, x_NK, w_EKO, offs_E):
        ctx.save_for_backward(x_NK, w_EKO, offs_E)
        return torch._grouped_mm(x_NK, w_EKO, offs=offs_E)

    @staticmethod
    def backward(ctx, grad_NO):
        x_NK, w_EKO, offs_E = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(grad_NO, w_EKO.transpose(1, 2), offs=offs_E)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x_NK, grad_NO, w_EKO, offs_E)
        return dx, dw, None


def _weight_grad(x_NK: torch.Tensor, grad_NO: torch.Tensor, w_EKO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``dw[e] = x[rows of e]^T @ grad[rows of e]``, in ``w``'s storage layout.

    When ``w`` is a transposed view of ``[E, O, K]`` storage the gradient is computed as
    ``[E, O, K]`` so it lands in that layout. ``torch._grouped_mm``'s 2-d x 2-d form takes
    the transposed operand as a view on CPU (BLAS reads it in place); elsewhere it needs
    a row-major copy.
    """
    def lhs(a_NX: torch.Tensor) -> torch.Tensor:
        return a_NX.t() if a_NX.device.type == "cpu" else _transposed_copy(a_NX)

    if w_EKO.stride(1) == 1:
        return torch._grouped_mm(lhs(grad_NO), x_NK, offs=offs_E).transpose(1, 2)
    return torch._grouped_mm(lhs(x_NK), grad_NO, offs=offs_E)


def grouped_mm(x_NK: torch.Tensor, w_EKO: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]``; rows sorted by expert, ``sum(counts) == N``.

    Uses ``torch._grouped_mm`` (one call, no loop over experts) when the layout allows it,
    else a padded ``bmm``. Without gradients the GEMM is the op ``megatron_seed::grouped_mm``
    (:func:`_grouped_mm_op`): opaque to ``torch.compile`` (compiled rollout decode; the fake-tensor
    rule of ``torch._grouped_mm`` accepts bf16 only, while CPU runs it in fp32), and on CPU the
    staged loop of :func:`_staged_cpu_grouped_mm`. The layout checks and the offsets stay in the
    traced code, so the opaque call is the bare GEMM.
    """
    N, O = x_NK.shape[0], w_EKO.shape[2]
    if N == 0:
        # an empty product that keeps x and w in the graph, so collectives in their
        # backward (the dispatcher's all-to-all) still run on this rank
        return x_NK @ w_EKO[0]
    usable = x_NK.device.type == "cpu" or x_NK.dtype == torch.bfloat16
    if not (usable and _aligned(x_NK) and _aligned(w_EKO) and (O * x_NK.element_size()) % 16 == 0 and (x_NK.shape[1] * x_NK.element_size()) % 16 == 0):
        return _segment_mm_padded(x_NK, w_EKO, tokens_per_expert_E)
    offs = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
    if _needs_grad(x_NK, w_EKO):
        return _GroupedMM.apply(x_NK, w_EKO, offs)
    return _grouped_mm_op(x_NK, w_EKO, offs)


@torch.library.custom_op("megatron_seed::grouped_mm", mutates_args=())
def _grouped_mm_op(x_NK: torch.Tensor, w_EKO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    if x_NK.device.type == "cpu":
        return _staged_cpu_grouped_mm(x_NK, w_EKO, offs_E)
    return torch._grouped_mm(x_NK, w_EKO, offs=offs_E)


def _staged_cpu_grouped_mm(x_NK: torch.Tensor, w_EKO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]``, one GEMM per non-empty expert on a contiguous copy of ``w[e]``.

    The copy goes into one buffer reused for every expert, in the layout ``w[e]``'s storage
    already has (row-major ``[O, K]`` for the experts' transposed views, so the copy is a straight
    stream). MKL's GEMM reads a weight in main memory far below the bandwidth a plain copy reaches
    when it has few rows to amortise its packing over (a decode step gives each expert a handful);
    from the freshly written buffer it reads cache instead, and the copy costs less than it saves
    (``benchmarks/RESULTS.md``, "Staged expert GEMMs"). Numerically it is a plain GEMM per expert.
    """
    # bf16 on a CPU without bf16 arithmetic: the staged copy upcasts the weight (megatron_seed/gemm.py)
    compute = torch.float32 if emulated_low_precision(x_NK) else x_NK.dtype
    x_NK = x_NK.to(compute)
    out = x_NK.new_empty(x_NK.shape[0], w_EKO.shape[2])
    K, O = w_EKO.shape[1:]
    # [K, O] view of the buffer with w[e]'s strides: [E, O, K] storage seen as [E, K, O] copies row by row
    staged_KO = x_NK.new_empty(O, K).t() if w_EKO.stride(1) == 1 else x_NK.new_empty(K, O)
    ends = offs_E.tolist()
    counts = [end - start for start, end in zip([0] + ends[:-1], ends)]
    for x_CK, out_CO, w_KO, rows in zip(x_NK.split(counts), out.split(counts), w_EKO.unbind(0), counts):
        if rows:
            staged_KO.copy_(w_KO)
            torch.mm(x_CK, staged_KO, out=out_CO)
    return out.to(w_EKO.dtype)


@_grouped_mm_op.register_fake
def _(x_NK: torch.Tensor, w_EKO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return x_NK.new_empty(x_NK.shape[0], w_EKO.shape[2])
