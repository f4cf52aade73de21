"""Forward/backward over the micro-batches of one step.

Contract shared by every schedule::

    forward_backward(chunks, microbatches, loss_fn, ps, schedule, forward_only) -> list

``chunks``: this rank's model chunks (one per virtual stage); ``microbatches``: a list
of dicts (every rank gets them; the first stage reads ``input_ids``, the last stage
the labels); ``loss_fn(output, microbatch) -> (loss, stats)`` runs on the last stage,
``loss`` already normalised so that summing over micro-batches and data-parallel
ranks gives the step's loss. Returns the ``stats`` of each micro-batch on the last
stage (an empty list elsewhere). With ``forward_only`` no gradient is computed and
``loss_fn`` may return any output in ``stats`` (evaluation, log-probs).
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_seed.parallel.state import ParallelState


def model_inputs(mb: dict) -> dict:
    """The keyword arguments of ``GPTModel.forward`` present in a micro-batch."""
    keys = ("position_ids_BS", "doc_ids_BS", "padding_mask_BS")
    return {k: mb[k] for k in keys if k in mb}


def forward_backward_no_pipelining(chunks: list, microbatches: list, loss_fn: Callable, forward_only: bool = False) -> list:
    (model,) = chunks
    stats = []
    for mb in microbatches:
        with torch.set_grad_enabled(not forward_only):
            output = model(mb["input_ids_BS"], **model_inputs(mb))
            loss, mb_stats = loss_fn(output, mb)
        if not forward_only:
            loss.backward()
        stats.append(mb_stats)
    return stats


def forward_backward(chunks: list, microbatches: list, loss_fn: Callable, ps: ParallelState, schedule: str = "1f1b", forward_only: bool = False) -> list:
    if ps.pp_size == 1:
        return forward_backward_no_pipelining(chunks, microbatches, loss_fn, forward_only)
    raise NotImplementedError("pipeline schedules are not built yet: set parallel.pp=1")
