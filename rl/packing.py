"""Packed, token-balanced micro-batches for the RL train steps (``train.max_tokens_per_micro_batch``).

Padding every row of a rollout batch to its longest sequence wastes most of a step when
one response is long and the rest are short. With a token budget ``T_max`` each
micro-batch is instead one row holding several whole sequences (prompt + response) side
by side, ``M`` micro-batches per mini-batch, ``T`` the packed row width::

    input_ids_BS    [1, T] = a a a a | b b b | c c ... | pad
    doc_ids_BS             = 0 0 0 0 | 1 1 1 | 2 2 ... | -1    attention stays inside a sequence
    position_ids_BS        = each sequence's own positions (RoPE sees what was sampled)
    padding_mask_BS        = True on packed tokens, False on the row's tail

Only a row's real tokens (``padding_mask_BS``) are packed, so left-padded prompts lose
their padding; every per-token ``*_BS`` key is packed the same way and unpacked outputs
go back to ``[B, S]`` (:func:`pack`, :func:`unpack`). Per-row ``*_B`` keys are not
carried: the losses read per-token keys only (:mod:`rl.ppo` spreads ``correct_B`` to
``positive_BS``).

:func:`plan_step` decides where every sequence goes, identically on every rank:

1. **dp balance.** The rows of the global batch are all-gathered over ``dp`` (the step
   needs the whole batch's lengths; the tensors are token ids and per-token floats, small
   next to the activations). Each global mini-batch (the same rows as without packing, so
   every optimizer step sees the same data) is split over the dp ranks by the
   Karmarkar-Karp largest differencing method on token counts (:func:`karmarkar_karp`).
2. **micro-batches.** ``M`` = the most bins of ``T_max`` tokens any dp rank needs for its
   part by first-fit decreasing; every rank then spreads its part over ``M`` bins longest
   first into the lightest bin (LPT), keeping its first-fit bins if LPT overflows one.
   A rank with fewer sequences gets empty micro-batches (padding only: zero loss, zero
   gradient), so every rank runs the same number: expert-parallel all-to-alls and
   pipeline schedules pair micro-batches across ranks.
3. **one width.** ``T`` is the fullest bin over every rank and mini-batch, rounded up to
   :func:`~megatron_seed.parallel.context_parallel.sequence_multiple` (tp, 2 cp): every
   micro-batch of the step has one shape (pipeline stages exchange one activation shape).

The loss normalisers do not change: they are counted on the micro-batches' tokens and
summed over dp (:meth:`megatron_seed.train.trainer.Trainer.train_step`), i.e. the global
batch's counts, so a packed step has the loss and gradients of the padded one.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_seed.config import ConfigError
from megatron_seed.parallel import context_parallel
from megatron_seed.parallel.context_parallel import is_token_key
from megatron_seed.parallel.mappings import reduce_scalars
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer

PADDING_DOC = -1  # doc id of a packed row's tail


def karmarkar_karp(weights: Sequence[int], parts: int) -> list:
    """Indices of ``weights`` in ``parts`` subsets with near-equal sums (largest differencing method).

    Every item starts as a partial partition (itself in one subset, the others empty);
    the two partitions with the largest spread (max - min sum) are merged, the heaviest
    subset of one with the lightest of the other, until one is left. On one long item and
    many short ones it puts the long one alone against the rest.
    """
    if parts < 1:
        raise ValueError(f"parts={parts}: must be >= 1")
    heap: list = []
    for i, w in enumerate(weights):
        subsets = [(int(w), [i])] + [(0, []) for _ in range(parts - 1)]
        heap.append((-int(w), i, subsets))
    heapq.heapify(heap)
    order = len(heap)  # tie-break of merged partitions: deterministic on every rank
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = sorted(((sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))), key=lambda s: -s[0])
        heapq.heappush(heap, (merged[-1][0] - merged[0][0], order, merged))
        order += 1
    if not heap:
        return [[] for _ in range(parts)]
    return [sorted(items) for _, items in heap[0][2]]


def first_fit_decreasing(lengths: dict, budget: int) -> list:
    """``{row: tokens}`` into bins of at most ``budget`` tokens: longest first, each into the first bin it fits."""
    bins: list = []
    loads: list = []
    for row in sorted(lengths, key=lambda r: (-lengths[r], r)):
        j = next((j for j, load in enumerate(loads) if load + lengths[row] <= budget), None)
        if j is None:
            bins.append([])
            loads.append(0)
            j = len(bins) - 1
        bins[j].append(row)
        loads[j] += lengths[row]
    return bins


def longest_first(lengths: dict, bins: int, budget: int) -> Optional[list]:
    """``{row: tokens}`` over ``bins`` bins, longest first into the lightest (LPT); None if one would pass ``budget``."""
    out: list = [[] for _ in range(bins)]
    loads = [0] * bins
    for row in sorted(lengths, key=lambda r: (-lengths[r], r)):
        j = min(range(bins), key=lambda k: (loads[k], k))
        if loads[j] + lengths[row] > budget:
            return None
        out[j].append(row)
        loads[j] += lengths[row]
    return out


@dataclass(frozen=True)
class PackedLayout:
    """This rank's packed micro-batches of one step.

    ``mini_batches[i][m]``: the (local) rows packed, in order, into micro-batch ``m`` of
    mini-batch ``i`` (empty: a micro-batch of padding only); ``width``: ``T`` of every
    packed row; ``rank_tokens``: the tokens each dp rank holds (the balance achieved).
    """

    mini_batches: tuple
    width: int
    rank_tokens: tuple

    @property
    def micro_batches(self) -> list:
        """Every micro-batch of the step, mini-batch after mini-batch (the forward-only passes)."""
        return [mb for mini in self.mini_batches for mb in mini]

    def imbalance(self) -> float:
        """``max / mean - 1`` of the dp ranks' tokens (0 = perfectly balanced)."""
        mean = sum(self.rank_tokens) / len(self.rank_tokens)
        return max(self.rank_tokens) / mean - 1.0 if mean > 0 else 0.0

    def metrics(self) -> dict:
        """``packing/dp_token_imbalance`` and ``packing/fill`` (real tokens / the packed rows' slots, every rank)."""
        slots = len(self.rank_tokens) * len(self.micro_batches) * self.width
        return {"packing/dp_token_imbalance": self.imbalance(), "packing/fill": sum(self.rank_tokens) / slots}


def sequence_tokens(batch: dict) -> torch.Tensor:
    """``[B]``: the real tokens of each row (``padding_mask_BS``), the tokens it takes in a packed row."""
    return batch["padding_mask_BS"].sum(dim=1)


def _gather_rows(batch: dict, ps: ParallelState) -> dict:
    """The global batch: every rank's rows over ``dp``, rank after rank, ``_BS`` keys right-padded to the widest."""
    group = ps.group("dp")
    B, S = batch["input_ids_BS"].shape
    widest, most, neg_fewest = reduce_scalars([S, B, -B], group, dist.ReduceOp.MAX, device=ps.device)
    if most != -neg_fewest:
        raise ValueError(f"dp ranks hold {int(-neg_fewest)} to {int(most)} rollout rows; token balancing needs the same number "
                         "on every rank (rl.experience.dp_shard)")
    out = {}
    for key, value in batch.items():
        if is_token_key(key) and value.shape[1] < widest:
            value = torch.cat([value, value.new_zeros((B, int(widest) - value.shape[1]) + value.shape[2:])], dim=1)
        local = value.to(torch.uint8) if value.dtype == torch.bool else value.contiguous()  # gloo gathers no bools
        parts = [torch.empty_like(local) for _ in range(ps.dp_size)]
        dist.all_gather(parts, local, group=group)
        out[key] = torch.cat(parts).to(value.dtype)
    return out


def plan_step(batch: dict, ps: ParallelState, mini_batches: int, max_tokens: int) -> tuple:
    """``(batch', layout)``: this rank's rows after dp token balancing and their packed micro-batches
    (module docstring). ``batch`` is this rank's share (:func:`rl.experience.dp_shard`); mini-batch
    ``i`` of the global batch is part ``i`` of every rank's rows, as in the padded step."""
    if ps.dp_size > 1:
        batch = _gather_rows(batch, ps)
    B = batch["input_ids_BS"].shape[0]
    tokens = sequence_tokens(batch).tolist()
    too_long = [(b, n) for b, n in enumerate(tokens) if n > max_tokens]
    if too_long:
        b, n = max(too_long, key=lambda x: x[1])
        raise ConfigError(f"train.max_tokens_per_micro_batch={max_tokens}: a sequence has {n} tokens (prompt + response, row {b} "
                          f"of the global batch; {len(too_long)} rows are longer than the budget) and a sequence is never split; "
                          f"fix: raise train.max_tokens_per_micro_batch to at least {n} (the longest prompt + rollout.max_new_tokens)")
    per_rank = B // ps.dp_size
    if per_rank % mini_batches:
        raise ValueError(f"{per_rank} rows per dp rank cannot be cut into rl.mini_batches={mini_batches} equal mini-batches")
    size = per_rank // mini_batches
    mine: list = []  # global rows this rank takes, mini-batch after mini-batch
    layout_minis: list = []
    rank_tokens = [0] * ps.dp_size
    widest = 0
    for i in range(mini_batches):
        rows = [r * per_rank + i * size + j for r in range(ps.dp_size) for j in range(size)]
        parts = [[rows[k] for k in part] for part in karmarkar_karp([tokens[r] for r in rows], ps.dp_size)]
        # the heaviest part to the rank holding the fewest tokens so far: the step's totals balance too
        ranks = sorted(range(ps.dp_size), key=lambda r: (rank_tokens[r], r))
        parts = dict(zip(ranks, sorted(parts, key=lambda p: (-sum(tokens[r] for r in p), p))))
        first_fit = {rank: first_fit_decreasing({r: tokens[r] for r in part}, max_tokens) for rank, part in parts.items()}
        count = max(1, max(len(bins) for bins in first_fit.values()))
        for rank, part in parts.items():
            rank_tokens[rank] += sum(tokens[r] for r in part)
            bins = longest_first({r: tokens[r] for r in part}, count, max_tokens)
            bins = bins if bins is not None else first_fit[rank] + [[] for _ in range(count - len(first_fit[rank]))]
            widest = max([widest] + [sum(tokens[r] for r in b) for b in bins])
            if rank == ps.dp_rank:
                local = {r: len(mine) + k for k, r in enumerate(sorted(part))}
                mine.extend(sorted(part))
                layout_minis.append(tuple(tuple(local[r] for r in sorted(b)) for b in bins))
    multiple = context_parallel.sequence_multiple(ps)
    width = max(multiple, -(-widest // multiple) * multiple)
    index = torch.as_tensor(mine, dtype=torch.long, device=batch["input_ids_BS"].device)
    local_batch = {k: v.index_select(0, index) for k, v in batch.items()}
    return local_batch, PackedLayout(tuple(layout_minis), width, tuple(rank_tokens))


@dataclass(frozen=True)
class _Positions:
    """Source ``(row, column)`` of every packed position ``[M, T]``; ``real_MT`` False on the tails."""

    rows_MT: torch.Tensor
    cols_MT: torch.Tensor
    real_MT: torch.Tensor
    doc_ids_MT: torch.Tensor


def _positions(padding_mask_BS: torch.Tensor, micro_batches: Sequence, width: int) -> _Positions:
    device = padding_mask_BS.device
    M = len(micro_batches)
    rows_MT = torch.zeros(M, width, dtype=torch.long, device=device)
    cols_MT = torch.zeros(M, width, dtype=torch.long, device=device)
    docs_MT = torch.full((M, width), PADDING_DOC, dtype=torch.long, device=device)
    for m, rows in enumerate(micro_batches):
        offset = 0
        for doc, row in enumerate(rows):
            cols = torch.nonzero(padding_mask_BS[row]).flatten()
            n = cols.numel()
            if offset + n > width:
                raise ValueError(f"micro-batch {m} holds {offset + n} tokens, more than its width {width}")
            rows_MT[m, offset:offset + n] = row
            cols_MT[m, offset:offset + n] = cols
            docs_MT[m, offset:offset + n] = doc
            offset += n
    return _Positions(rows_MT, cols_MT, docs_MT != PADDING_DOC, docs_MT)


def pack(batch: dict, micro_batches: Sequence, width: int) -> list:
    """The packed micro-batches ``[1, width]`` of ``batch``'s rows: every ``*_BS`` key packed, ``doc_ids_BS``
    added, ``padding_mask_BS`` False on the tails (zeros in every other key there)."""
    at = _positions(batch["padding_mask_BS"], micro_batches, width)
    packed = {}
    for key, value in batch.items():
        if is_token_key(key):
            out = value.new_zeros((len(micro_batches), width) + value.shape[2:])
            out[at.real_MT] = value[at.rows_MT[at.real_MT], at.cols_MT[at.real_MT]]
            packed[key] = out
    packed["doc_ids_BS"] = at.doc_ids_MT
    return [{k: v[m:m + 1] for k, v in packed.items()} for m in range(len(micro_batches))]


def unpack(x_MT: torch.Tensor, batch: dict, micro_batches: Sequence, width: int) -> torch.Tensor:
    """Per-token outputs of the packed micro-batches ``[M, T]`` back in ``batch``'s rows ``[B, S]`` (0 on padding)."""
    at = _positions(batch["padding_mask_BS"], micro_batches, width)
    out_BS = x_MT.new_zeros(batch["padding_mask_BS"].shape)
    out_BS[at.rows_MT[at.real_MT], at.cols_MT[at.real_MT]] = x_MT[at.real_MT]
    return out_BS


def forward_rows(trainer: Trainer, batch: dict, fn: Callable, layout: Optional[PackedLayout] = None,
                 chunks: Optional[list] = None) -> Optional[torch.Tensor]:
    """:meth:`Trainer.forward` of ``fn`` on ``batch``'s rows, ``[B, S]``: through the packed micro-batches of
    ``layout`` (unpacked back into the rows; 0 on padding), or the rows themselves without one."""
    if layout is None:
        return trainer.forward(batch, fn, chunks)
    micro = layout.micro_batches
    out_MT = trainer.forward(pack(batch, micro, layout.width), fn, chunks)
    return None if out_MT is None else unpack(out_MT, batch, micro, layout.width)
