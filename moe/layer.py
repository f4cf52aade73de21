"""The MoE block: router -> token dispatcher -> grouped experts -> combine, plus shared experts.

``y = sum_{e in topk(x)} w_e(x) * expert_e(x) + shared(x)`` with Qwen3-MoE semantics by
default (softmax router over all experts in fp32, top-k, renormalised weights, SwiGLU
experts). Shapes: ``x_BSH`` in and out; under sequence parallel ``S`` is the local
shard ``S / tp``.

Parameter names (HF Qwen3-MoE names in brackets, see :mod:`moe.experts`):

* ``router.weight [E, H]`` (``mlp.gate.weight``); buffer ``router.expert_bias [E]`` with sigmoid routing or
  when aux-loss-free balancing is on (GLM-4.5-MoE: ``mlp.gate.e_score_correction_bias``);
* ``experts.w_gate_up [E, 2, F, H]`` (``mlp.experts.{e}.gate_proj`` / ``up_proj``);
* ``experts.w_down [E, H, F]`` (``mlp.experts.{e}.down_proj``);
* ``shared_experts.{gate,up,down}_proj.weight`` when ``num_shared_experts > 0``.

Parallelism: experts are split over ep (and their ffn over etp); the router and shared
experts are replicated / tp-split like dense layers. With tp > 1 and no sequence
parallel, every tp rank holds the same tokens: the routed path then works on this rank's
sequence chunk and all-gathers the result, so no token is computed twice.

Routing replay (R3): ``routes_BSA`` (this layer's routes recorded by the rollout for the full
sequence, one-based expert ids, 0 = none) is compared with the router's own choice and, when
``replay_routes`` is set (the RL actor with ``rl.routing_replay=rollout``), used instead of it
(see :mod:`moe.router`). ``compare_BS`` (True = counted) picks the tokens whose disagreement is
added to ``route_counts`` (``[differing, compared]`` since the last ``reset_route_counts``).
``last_routes_BSA`` holds the experts this forward used for its local tokens (before capacity),
all-gathered over tp to the whole sequence when ``gather_routes`` is set (the rollout records them).

The aux and z losses reach the gradients by themselves (scaled by ``aux_loss_scale``,
which the trainer sets to ``1 / num_microbatches``); ``last_stats`` holds the detached
``aux_loss``, ``z_loss`` and local ``tokens_per_expert`` of the last forward. With
``bias_update_rate > 0`` call :func:`moe.router.update_expert_biases` after each step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_seed.config import ModelConfig
from megatron_seed.parallel.mappings import gather_from_parallel_region, scatter_to_sequence_parallel_region
from megatron_seed.parallel.state import ParallelState
from moe.dispatcher import build_dispatcher
from moe.experts import GroupedExperts, SharedExperts
from moe.kernels import ops, resolve_backend
from moe.router import Router


class MoELayer(nn.Module):
    """Routed SwiGLU experts (expert-parallel) plus optional shared experts."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        moe = cfg.moe
        self.moe_cfg, self.ps = moe, ps
        self.router = Router(moe, cfg.hidden_size, ps)
        self.experts = GroupedExperts(moe.num_experts, cfg.hidden_size, moe.ffn_size, ps)
        self.shared_experts = (
            SharedExperts(cfg.hidden_size, moe.num_shared_experts * moe.shared_ffn_size, ps) if moe.num_shared_experts else None
        )
        self.aux_loss_scale: float = 1.0
        self.last_stats: dict = {}
        self.replay_routes = False
        self.gather_routes = False
        self.last_routes_BSA: Optional[torch.Tensor] = None
        self.route_counts: Optional[torch.Tensor] = None

    def reset_route_counts(self) -> None:
        self.route_counts = None

    def forward(self, x_BSH: torch.Tensor, valid_BS: Optional[torch.Tensor] = None, routes_BSA: Optional[torch.Tensor] = None,
                compare_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``valid_BS`` (True = real token, the full sequence even under sequence parallel) keeps
        padding out of the balancing statistics; padding is still routed and computed. ``routes_BSA`` and
        ``compare_BS`` (full sequence too): recorded routes and the tokens whose disagreement is counted."""
        ps = self.ps
        if routes_BSA is not None:
            full_S = x_BSH.shape[1] * (ps.tp_size if ps.sequence_parallel else 1)
            expected = (x_BSH.shape[0], full_S, self.moe_cfg.top_k)
            if tuple(routes_BSA.shape) != expected:
                raise ValueError(f"MoELayer: recorded routes of shape {tuple(routes_BSA.shape)} for {expected[0]} rows x {full_S} tokens "
                                 f"x top_k={expected[2]}; were they recorded with another model.moe.top_k or for another batch?")
        split_tokens = ps.tp_size > 1 and not ps.sequence_parallel
        if split_tokens and x_BSH.shape[1] % ps.tp_size:
            if torch.is_grad_enabled():
                raise ValueError(f"MoELayer: sequence length {x_BSH.shape[1]} must be divisible by tp={ps.tp_size}")
            # Inference with S % tp != 0 (decode steps, S=1): each tp rank routes all its tokens
            # itself; same outputs, and no gradient exists that the duplicated work could double.
            split_tokens = False
        x_local = scatter_to_sequence_parallel_region(x_BSH, ps.tp_group, 1) if split_tokens else x_BSH
        B, S, H = x_local.shape
        local = slice(ps.tp_rank * S, (ps.tp_rank + 1) * S) if split_tokens or ps.sequence_parallel else slice(None)  # this rank's chunk
        valid_BS = valid_BS[:, local] if valid_BS is not None else None
        routes_BSA = routes_BSA[:, local] if routes_BSA is not None else None
        routing = self.router(x_local, self.aux_loss_scale, valid_BS, routes_BSA.reshape(-1, self.moe_cfg.top_k) if routes_BSA is not None else None,
                              self.replay_routes)
        if compare_BS is not None and routing.differs_T is not None:
            counted_T = compare_BS[:, local].reshape(-1).to(routing.differs_T.device) & (routes_BSA.reshape(B * S, -1) > 0).all(dim=-1)
            counts = torch.stack([(routing.differs_T & counted_T).sum(), counted_T.sum()]).double()
            self.route_counts = counts if self.route_counts is None else self.route_counts + counts
        routes_BSA = routing.selected_TA.view(B, S, -1)
        if self.gather_routes and split_tokens:
            routes_BSA = gather_from_parallel_region(routes_BSA, ps.tp_group, 1)
        self.last_routes_BSA = routes_BSA
        kernels = ops(resolve_backend(self.moe_cfg.kernel_backend, x_BSH.device))
        dispatcher = build_dispatcher(self.moe_cfg.dispatcher, self.moe_cfg.num_experts, self.moe_cfg.top_k, ps, kernels,
                                      capacity=self.moe_cfg.capacity_factor is not None)
        rows_NH, tokens_per_expert_L, weights_N = dispatcher.token_dispatch(x_local.reshape(-1, H), routing.weights_TA, routing.experts_TA)
        out_NH = self.experts(rows_NH, tokens_per_expert_L, kernels, weights_N)
        y_BSH = dispatcher.token_combine(out_NH).view(B, S, H)
        if split_tokens:
            y_BSH = gather_from_parallel_region(y_BSH, ps.tp_group, 1)
        if self.shared_experts is not None:
            y_BSH = y_BSH + self.shared_experts(x_BSH)
        self.last_stats = {
            "aux_loss": routing.aux_loss.detach(),
            "z_loss": routing.z_loss.detach(),
            "tokens_per_expert": routing.tokens_per_expert_E.detach(),
        }
        return y_BSH
