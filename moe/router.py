"""Top-k router: scores, expert choice, load-balancing losses, capacity, bias balancing.

Shapes: ``B`` batch, ``S`` local sequence, ``H`` hidden, ``T = B*S`` local tokens, ``E``
experts, ``A`` top-k slots.

* Scores: ``softmax(x W^T)`` over all experts (Qwen3-MoE) or ``sigmoid(x W^T)``
  (DeepSeek-V3), in ``router_dtype`` (fp32 by default); ``W`` is ``router.weight [E, H]``.
* Choice: top-k of ``scores + expert_bias`` (optionally group-limited); weights are the
  chosen unbiased scores, renormalised to sum to 1 when ``norm_topk_prob``.
* Aux loss (Switch / Qwen formula): ``L_aux = E * sum_e f_e * P_e`` with
  ``f_e = count_e / (T * A)`` and ``P_e = mean_t p_{t,e}`` (``p`` = softmax scores, or sigmoid
  scores normalised per token), over the micro-batch (``micro_batch``) or per sequence and
  averaged over sequences (``sequence``). Balanced routing gives 1.
* Z loss: ``L_z = mean_t logsumexp(logits_t)^2``.
* Padding (``valid_BS`` False) is still routed, but counts nowhere: not in ``T``, the
  counts, ``P_e``, the z-loss mean, the logged loads or the balancing bias's load, so a
  padded batch balances and logs like its real tokens alone.
* The gradients of ``aux_loss_coef * L_aux + z_loss_coef * L_z`` reach the router through
  :class:`AuxLossAutoScaler` attached to the routing weights; callers add nothing.
* Aux-loss-free balancing (``bias_update_rate > 0``): :meth:`Router.update_expert_bias`
  moves ``bias_e += rate * sign(mean_load - load_e)`` using the loads counted since the
  last update, all-reduced over every group that sees other tokens.
* Forced balance (``router_force_balance``, benchmarks and the dry run): every expert and every
  ep rank gets the same share of the slots whatever the scores (:func:`balanced_experts`);
  weights are those experts' scores.
* Capacity (``capacity_factor``): each expert keeps at most ``ceil(cf * T * A / E)`` slots,
  the highest-weighted ones; dropped slots get expert id ``E``.
* Routing replay (R3, ``recorded_TA`` with ``replay=True``): a token with a recorded route (the
  experts the rollout chose for it, one-based ids, 0 = none recorded) uses exactly those experts;
  its weights are recomputed from the current logits by the usual rule (the scores at the
  replayed experts, renormalised when ``norm_topk_prob``), so the router gets the gradient of
  the weights at fixed indices. Balancing uses the replayed routes consistently: the counts
  ``count_e`` (aux loss ``f_e``, logged loads, the balancing bias's load) come from the replayed
  indices, the probabilities ``P_e`` and the z-loss from the current logits. A token without a
  recorded route (padding, a row's last token, which the rollout never fed back) keeps its own
  choice; padding still counts nowhere (``valid_BS``). Capacity, when on, applies after replay.
* Route comparison: with ``recorded_TA`` given, ``Routing.differs_T`` says for each token with a
  recorded route whether the router's own top-k set differs from it (what replay corrects).

Under sequence parallel (or cp) a micro-batch's tokens are spread over the tp (cp) ranks:
counts are all-reduced over them and each rank contributes its share of ``P_e`` and of the
z-loss sum, so the summed gradients equal the one-process ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_seed.config import MoEConfig
from megatron_seed.parallel.mappings import all_reduce_no_grad
from megatron_seed.parallel.sharding import set_sharding
from megatron_seed.parallel.state import ParallelState
from moe.kernels import ops, resolve_backend
from moe.kernels.reference import expert_counts


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient ``scale`` into ``loss``.

    Megatron's MoEAuxLossAutoScaler: the loss joins the graph without being added to the
    model's output; ``scale`` is the trainer's ``1 / num_microbatches``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


@dataclass
class Routing:
    """What the router decided for the local tokens."""

    weights_TA: torch.Tensor  # fp32 routing weights, carrying the aux-loss gradients
    experts_TA: torch.Tensor  # int64 expert ids; E marks a slot dropped by capacity
    tokens_per_expert_E: torch.Tensor  # local counts before capacity dropping (detached)
    aux_loss: torch.Tensor  # detached L_aux of the micro-batch (0 when off)
    z_loss: torch.Tensor  # detached L_z of the micro-batch (0 when off)
    selected_TA: torch.Tensor  # the experts chosen (or replayed) before capacity dropping: what a rollout records
    differs_T: Optional[torch.Tensor] = None  # with recorded routes: own top-k set != the recorded one (False: none recorded)


def balanced_experts(T: int, A: int, E: int, ep: int, device: torch.device) -> torch.Tensor:
    """Forced balance: slot ``i = t * A + a`` (taken mod E) goes to expert ``(i mod ep) * E/ep + i // ep``,
    round robin over the ep ranks first, so each rank receives the same number of slots whenever
    ep divides ``T * A`` (a bijection of ``[0, E)``: a token's A <= E slots get distinct experts)."""
    i = torch.arange(T * A, device=device) % E
    return ((i % ep) * (E // ep) + i // ep).view(T, A)


def token_groups(ps: ParallelState) -> list:
    """Groups whose ranks hold other tokens of the same micro-batch (sequence split)."""
    return [ps.group(name) for name in ("tp", "cp") if ps.size(name) > 1]


def apply_capacity(weights_TA: torch.Tensor, experts_TA: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Expert ids with slots beyond each expert's capacity set to ``num_experts``.

    capacity = ceil(capacity_factor * T * A / E); an expert keeps its highest-weighted slots.
    """
    T, A = experts_TA.shape
    capacity = math.ceil(capacity_factor * T * A / num_experts)
    flat_e = experts_TA.reshape(-1)
    by_weight = torch.sort(weights_TA.detach().reshape(-1), descending=True, stable=True).indices
    order = by_weight[torch.sort(flat_e[by_weight], stable=True).indices]  # by expert, then weight
    counts = torch.bincount(flat_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.empty_like(order)
    rank_in_expert[order] = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
    return torch.where(rank_in_expert < capacity, flat_e, num_experts).view(T, A)


class Router(nn.Module):
    """Linear router ``H -> E`` (no bias) with top-k choice and balancing losses."""

    def __init__(self, cfg: MoEConfig, hidden_size: int, ps: ParallelState):
        super().__init__()
        self.cfg, self.ps = cfg, ps
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.dtype = getattr(torch, cfg.router_dtype)
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        # replicated over tp, but each tp rank routes other tokens when tp > 1: grads all-reduced over tp
        set_sharding(self.weight, (cfg.num_experts, hidden_size), partial_tp_grad=ps.tp_size > 1)
        self.balance_bias = cfg.bias_update_rate > 0
        # sigmoid routing always carries the bias (DeepSeek-V3 / GLM-4.5's e_score_correction_bias), so a
        # converted model keeps it even when this run does not update it
        self.has_bias = self.balance_bias or cfg.score_function == "sigmoid"
        if self.has_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        if self.balance_bias:
            self.register_buffer("expert_load", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)

    def forward(self, x_BSH: torch.Tensor, aux_loss_scale: float = 1.0, valid_BS: Optional[torch.Tensor] = None,
                recorded_TA: Optional[torch.Tensor] = None, replay: bool = False) -> Routing:
        """Route the local tokens; ``valid_BS`` (True = real token, local shard) keeps padding out of the statistics.

        ``recorded_TA``: routes recorded elsewhere for these tokens (one-based expert ids, 0 = none), compared
        with the router's own choice (``Routing.differs_T``) and, with ``replay``, used instead of it.
        """
        B, S, H = x_BSH.shape
        cfg = self.cfg
        logits_TE = F.linear(x_BSH.reshape(-1, H).to(self.dtype), self.weight.to(self.dtype))
        kernels = ops(resolve_backend(cfg.kernel_backend, logits_TE.device))
        bias = self.expert_bias if self.has_bias else None
        weights_TA, experts_TA, scores_TE = kernels.topk_routing(
            logits_TE, self.top_k, cfg.score_function, cfg.norm_topk_prob, bias, cfg.num_groups, cfg.top_groups
        )
        if cfg.router_force_balance:
            experts_TA = balanced_experts(logits_TE.shape[0], self.top_k, self.num_experts, self.ps.ep_size, logits_TE.device)
            weights_TA = self._weights_at(scores_TE, experts_TA)
        differs_T = None
        if recorded_TA is not None:
            recorded_TA = recorded_TA.long() - 1
            has_route_T = (recorded_TA >= 0).all(dim=-1)
            own_TA = experts_TA.sort(dim=-1).values
            differs_T = has_route_T & (own_TA != recorded_TA.sort(dim=-1).values).any(dim=-1)
            if replay:
                experts_TA = torch.where(has_route_T.unsqueeze(1), recorded_TA, experts_TA)
                weights_TA = self._weights_at(scores_TE, experts_TA)
        valid_T = None if valid_BS is None else valid_BS.reshape(-1).to(torch.bool)
        tokens_per_expert_E = expert_counts(experts_TA, self.num_experts, valid_T)
        if self.balance_bias and self.training:
            self.expert_load += tokens_per_expert_E.float()
        if self.training or torch.is_grad_enabled():
            loss, aux_loss, z_loss = self._losses(logits_TE, scores_TE, experts_TA, B, valid_T)
        else:  # inference (rollout decode): no gradient to feed; skip ~20 small ops and a collective per layer
            loss, aux_loss, z_loss = None, logits_TE.new_zeros(()), logits_TE.new_zeros(())
        if loss is not None and torch.is_grad_enabled():
            weights_TA = AuxLossAutoScaler.apply(weights_TA, loss, aux_loss_scale)
        selected_TA = experts_TA
        if cfg.capacity_factor is not None:
            experts_TA = apply_capacity(weights_TA, experts_TA, self.num_experts, cfg.capacity_factor)
        return Routing(weights_TA, experts_TA, tokens_per_expert_E, aux_loss, z_loss, selected_TA, differs_T)

    def _weights_at(self, scores_TE: torch.Tensor, experts_TA: torch.Tensor) -> torch.Tensor:
        """The router's weight rule at experts chosen by another rule (forced balance, replayed routes): their
        scores, renormalised over the top-k when ``norm_topk_prob``."""
        weights_TA = scores_TE.gather(1, experts_TA)
        return weights_TA / weights_TA.sum(dim=-1, keepdim=True) if self.cfg.norm_topk_prob else weights_TA

    def _losses(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, experts_TA: torch.Tensor, B: int,
                valid_T: Optional[torch.Tensor]) -> tuple:
        """(differentiable local share of the weighted losses or None, L_aux, L_z) for the micro-batch.

        Per statistics row ``r`` with ``n_r > 0`` real tokens (over all ranks), ``R`` such rows:
        ``L_aux = sum_r E / (A * n_r^2 * R) * sum_e count_{r,e} * prob_sum_{r,e}``.
        """
        cfg, E, A = self.cfg, self.num_experts, self.top_k
        use_aux = cfg.aux_loss_type != "none" and cfg.aux_loss_coef > 0
        use_z = cfg.z_loss_coef > 0
        zero = logits_TE.new_zeros(())
        if not (use_aux or use_z):
            return None, zero, zero
        T = logits_TE.shape[0]
        rows = B if cfg.aux_loss_type == "sequence" else 1  # rows of statistics: sequences or the micro-batch
        weight_T = logits_TE.new_ones(T) if valid_T is None else valid_T.to(logits_TE.dtype)
        if use_aux:
            probs_TE = scores_TE if cfg.score_function == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            prob_sum_RE = (probs_TE * weight_T.unsqueeze(1)).view(rows, T // rows, E).sum(1)
            counts_RE = logits_TE.new_zeros(rows, E).scatter_add_(1, experts_TA.view(rows, -1), weight_T.repeat_interleave(A).view(rows, -1))
        else:
            prob_sum_RE = counts_RE = logits_TE.new_zeros(rows, E)
        lse_sq_sum = (torch.logsumexp(logits_TE, dim=-1).square() * weight_T).sum() if use_z else zero
        tokens_R = weight_T.view(rows, -1).sum(1)
        packet = torch.cat([counts_RE.flatten(), prob_sum_RE.detach().flatten(), lse_sq_sum.detach().view(1), tokens_R])
        for group in token_groups(self.ps):
            all_reduce_no_grad(packet, group)
        n = rows * E
        counts_g, prob_sum_g, lse_sq_g, tokens_g_R = packet[:n].view(rows, E), packet[n : 2 * n].view(rows, E), packet[2 * n], packet[2 * n + 1 :]
        # a row of padding only has no statistics: it contributes 0 (not NaN) and is not averaged over
        rows_with_tokens = (tokens_g_R > 0).sum().clamp_min(1)
        aux_norm_R1 = (E / (A * tokens_g_R.clamp_min(1).square() * rows_with_tokens)).unsqueeze(1)
        tokens_g = tokens_g_R.sum().clamp_min(1)
        local = zero
        aux_loss = z_loss = zero
        if use_aux:
            local = local + cfg.aux_loss_coef * (aux_norm_R1 * counts_g * prob_sum_RE).sum()
            aux_loss = (aux_norm_R1 * counts_g * prob_sum_g).sum()
        if use_z:
            local = local + cfg.z_loss_coef * lse_sq_sum / tokens_g
            z_loss = lse_sq_g / tokens_g
        return local, aux_loss, z_loss

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free step: ``bias += rate * sign(mean(load) - load)``.

        Call once per optimizer step on every rank: the loads counted since the last call
        are summed over tp, cp and dp, so every replica keeps identical biases.
        """
        if not self.balance_bias:
            return
        load = self.expert_load
        for name in ("tp", "dp_cp"):
            if self.ps.size(name) > 1:
                all_reduce_no_grad(load, self.ps.group(name))
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


def update_expert_biases(module: nn.Module) -> None:
    """Apply :meth:`Router.update_expert_bias` to every router in ``module``."""
    for m in module.modules():
        if isinstance(m, Router):
            m.update_expert_bias()
