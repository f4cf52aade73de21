"""Token dispatchers: send each token-slot to the rank holding its expert and back.

Shapes: ``T`` local tokens, ``H`` hidden, ``A`` top-k slots, ``E`` experts,
``L = E / ep`` local experts, ``N`` rows this rank's experts compute.

Both dispatchers follow Megatron-core's hook split so communication can later overlap
computation::

    dispatch_preprocess -> dispatch -> dispatch_postprocess -> experts
    -> combine_preprocess -> combine -> combine_postprocess

* :class:`AllToAllDispatcher` (dropless): slots sorted by expert, per-expert counts
  exchanged over ep first, then one all-to-all with uneven splits; received rows
  (ordered by source rank, then expert) are re-sorted by local expert. With expert-tp
  (etp > 1) the etp ranks first all-gather their tokens (so each computes its F-shard
  of the same rows) and the combined outputs are reduce-scattered back over etp.
* :class:`AllGatherDispatcher`: every rank of the etp x ep group all-gathers all tokens,
  computes the slots routed to its local experts, and the weighted outputs are
  reduce-scattered back; cheaper than all-to-all for small ep.

Dropped slots (expert id ``E``, see the router's capacity) are never sent. Each row's
routing weight travels with it (``weights_N``, through the same all-to-all) and the experts
apply it inside the SwiGLU, on ``[N, F]`` rather than ``[N, H]``; the combine then only
sums each token's rows (``kernels.combine_rows``, one ``index_add``).
"""
from __future__ import annotations

import torch

from megatron_seed.config import ConfigError
from megatron_seed.parallel.mappings import (
    all_to_all,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_seed.parallel.state import ParallelState


def _chunk_sort_index(counts_SL: torch.Tensor) -> torch.Tensor:
    """Row index turning rows ordered (source, expert) into rows ordered (expert, source)."""
    S, L = counts_SL.shape
    flat = counts_SL.reshape(-1)
    in_starts = torch.cumsum(flat, 0) - flat
    by_expert = counts_SL.t().reshape(-1)  # chunk lengths in output order
    chunk_ids = torch.arange(S * L, device=flat.device).view(S, L).t().reshape(-1)
    out_starts = torch.cumsum(by_expert, 0) - by_expert
    N = int(flat.sum())
    shift = torch.repeat_interleave(in_starts[chunk_ids] - out_starts, by_expert, output_size=N)
    return torch.arange(N, device=flat.device) + shift


class _Dispatcher:
    """Shared state and the local permute/unpermute steps."""

    def __init__(self, num_experts: int, top_k: int, ps: ParallelState, kernels, capacity: bool = False):
        self.num_experts, self.top_k, self.ps, self.kernels = num_experts, top_k, ps, kernels
        self.capacity = capacity  # the router may drop slots (expert id E)
        self.ep = ps.size("ep")
        self.num_local_experts = num_experts // self.ep
        self.first_expert = ps.rank_in("ep") * self.num_local_experts

    def token_dispatch(self, x_TH: torch.Tensor, weights_TA: torch.Tensor, experts_TA: torch.Tensor) -> tuple:
        """``(rows_NH, tokens_per_local_expert_L, weights_N)`` ready for the experts."""
        rows_NH, weights_N = self.dispatch(*self.dispatch_preprocess(x_TH, weights_TA, experts_TA))
        return self.dispatch_postprocess(rows_NH, weights_N)

    def token_combine(self, out_NH: torch.Tensor) -> torch.Tensor:
        """``y_TH``: the (already weighted) expert outputs summed back onto the local tokens."""
        return self.combine_postprocess(self.combine(self.combine_preprocess(out_NH)))

    def _permute(self, x_TH: torch.Tensor, weights_TA: torch.Tensor) -> tuple:
        """Rows and their routing weights in ``self.slots_N`` order."""
        self.num_tokens = x_TH.shape[0]
        return self.kernels.permute(x_TH, self.slots_N, self.top_k), weights_TA.reshape(-1).index_select(0, self.slots_N)

    def _unpermute(self, out_NH: torch.Tensor) -> torch.Tensor:
        return self.kernels.combine_rows(out_NH, self.slots_N, self.num_tokens, self.top_k)

    @staticmethod
    def _gather_tokens(x_TH: torch.Tensor, weights_TA: torch.Tensor, experts_TA: torch.Tensor, group) -> tuple:
        """All-gather tokens and their routing over ``group`` (backward: reduce-scatter)."""
        x_TH = gather_from_sequence_parallel_region(x_TH, group, 0)
        weights_TA = gather_from_sequence_parallel_region(weights_TA, group, 0)
        with torch.no_grad():
            experts_TA = gather_from_sequence_parallel_region(experts_TA, group, 0)
        return x_TH, weights_TA, experts_TA


class AllToAllDispatcher(_Dispatcher):
    """Dropless all-to-all over ep with uneven splits (etp: gather / reduce-scatter)."""

    def dispatch_preprocess(self, x_TH: torch.Tensor, weights_TA: torch.Tensor, experts_TA: torch.Tensor) -> tuple:
        x_TH, weights_TA, experts_TA = self._gather_tokens(x_TH, weights_TA, experts_TA, self.ps.group("etp"))
        self.slots_N, tokens_per_expert_E = self.kernels.sort_slots(experts_TA, self.num_experts, droppable=self.capacity)
        self.send_counts_E = tokens_per_expert_E
        return self._permute(x_TH, weights_TA)

    def dispatch(self, rows_NH: torch.Tensor, weights_N: torch.Tensor) -> tuple:
        if self.ep == 1:
            self.recv_counts_SL = self.send_counts_E.view(1, -1)
            return rows_NH, weights_N
        group = self.ps.group("ep")
        with torch.no_grad():
            self.recv_counts_SL = all_to_all(self.send_counts_E.contiguous(), group).view(self.ep, self.num_local_experts)
        self.input_splits = self.send_counts_E.view(self.ep, -1).sum(1).tolist()
        self.output_splits = self.recv_counts_SL.sum(1).tolist()
        return (
            all_to_all(rows_NH, group, self.output_splits, self.input_splits),
            all_to_all(weights_N, group, self.output_splits, self.input_splits),
        )

    def dispatch_postprocess(self, rows_NH: torch.Tensor, weights_N: torch.Tensor) -> tuple:
        tokens_per_local_expert_L = self.recv_counts_SL.sum(0)
        if self.ep == 1:
            return rows_NH, tokens_per_local_expert_L, weights_N
        self.sort_index_N = _chunk_sort_index(self.recv_counts_SL)
        return rows_NH.index_select(0, self.sort_index_N), tokens_per_local_expert_L, weights_N.index_select(0, self.sort_index_N)

    def combine_preprocess(self, out_NH: torch.Tensor) -> torch.Tensor:
        if self.ep == 1:
            return out_NH
        unsort = torch.empty_like(self.sort_index_N)
        unsort[self.sort_index_N] = torch.arange(unsort.numel(), device=unsort.device)
        return out_NH.index_select(0, unsort)

    def combine(self, out_NH: torch.Tensor) -> torch.Tensor:
        if self.ep == 1:
            return out_NH
        return all_to_all(out_NH, self.ps.group("ep"), self.input_splits, self.output_splits)

    def combine_postprocess(self, out_NH: torch.Tensor) -> torch.Tensor:
        return reduce_scatter_to_sequence_parallel_region(self._unpermute(out_NH), self.ps.group("etp"), 0)


class AllGatherDispatcher(_Dispatcher):
    """All-gather over etp x ep; each rank computes only the slots of its local experts."""

    def dispatch_preprocess(self, x_TH: torch.Tensor, weights_TA: torch.Tensor, experts_TA: torch.Tensor) -> tuple:
        x_TH, weights_TA, experts_TA = self._gather_tokens(x_TH, weights_TA, experts_TA, self.ps.group("expert_model_parallel"))
        with torch.no_grad():
            local_TA = experts_TA - self.first_expert
            local_TA = torch.where((local_TA >= 0) & (local_TA < self.num_local_experts), local_TA, self.num_local_experts)
        self.slots_N, self.tokens_per_local_expert_L = self.kernels.sort_slots(local_TA, self.num_local_experts)
        return self._permute(x_TH, weights_TA)

    def dispatch(self, rows_NH: torch.Tensor, weights_N: torch.Tensor) -> tuple:
        return rows_NH, weights_N

    def dispatch_postprocess(self, rows_NH: torch.Tensor, weights_N: torch.Tensor) -> tuple:
        return rows_NH, self.tokens_per_local_expert_L, weights_N

    def combine_preprocess(self, out_NH: torch.Tensor) -> torch.Tensor:
        return out_NH

    def combine(self, out_NH: torch.Tensor) -> torch.Tensor:
        return out_NH

    def combine_postprocess(self, out_NH: torch.Tensor) -> torch.Tensor:
        return reduce_scatter_to_sequence_parallel_region(self._unpermute(out_NH), self.ps.group("expert_model_parallel"), 0)


def build_dispatcher(kind: str, num_experts: int, top_k: int, ps: ParallelState, kernels, capacity: bool = False) -> _Dispatcher:
    """``alltoall`` or ``allgather`` (``model.moe.dispatcher``); ``capacity``: the router may drop slots."""
    classes = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}
    if kind not in classes:
        raise ConfigError(f"model.moe.dispatcher={kind!r}: must be one of {', '.join(classes)}")
    return classes[kind](num_experts, top_k, ps, kernels, capacity)
