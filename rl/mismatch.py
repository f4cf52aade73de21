"""How far the rollout's numbers are from training's on the same tokens and weights (``mismatch/*`` metrics).

The rollout engine and the training forward run the same weights on the same tokens, yet
batching, kernels, precision or compiled decoding can make them differ; in an MoE a tiny
difference in the router logits can flip a token's expert choice and change its log-prob a
lot. Measured on every PPO step, over the response tokens of the global batch (reduced over
``dp``; cp ranks hold the same rows and the log-probs come back whole):

* ``mismatch/logp_abs_diff_mean``, ``mismatch/logp_abs_diff_max``: ``|logp_train - logp_rollout|``
  per response token;
* ``mismatch/logp_frac_above_1e-3``: the share of response tokens where that exceeds ``1e-3``;
* ``mismatch/seq_log_ratio_std``, ``mismatch/seq_log_ratio_abs_max``: spread over rows of the
  log of the sequence-level importance ratio ``log r_b = sum_s (logp_train - logp_rollout)``
  (its std, and its largest ``|log r_b|``).

* ``mismatch/route_diff_layer{i}`` (``i`` the global layer index) and ``mismatch/route_diff_mean``
  (over every MoE layer's tokens): the share of response tokens (positions with a label to
  train, ``mask_BS``) whose top-k expert set chosen by the router in training differs from the
  set the rollout recorded for them. Under ``rl.routing_replay=rollout`` training uses the
  recorded experts, and this still measures what its router alone would have picked.

``logp_train`` and the routes are those of training's first forward of the batch at the
rollout's weights (the recomputed behaviour log-probs, :mod:`rl.ppo`).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_seed.parallel.mappings import reduce_scalars
from megatron_seed.parallel.state import ParallelState

ABOVE = 1e-3  # a log-prob difference above this counts as a mismatched token


def logprob_mismatch(logp_train_BS: torch.Tensor, logp_rollout_BS: torch.Tensor, mask_BS: torch.Tensor, ps: ParallelState) -> dict:
    """The ``mismatch/logp*`` and ``mismatch/seq_log_ratio*`` metrics (module docstring) of this rank's rows,
    reduced over ``dp``: one float64 sum packet and one max packet."""
    mask_BS = mask_BS.to(logp_train_BS.device).bool()
    diff_BS = torch.where(mask_BS, logp_train_BS.double() - logp_rollout_BS.to(logp_train_BS.device).double(), 0.0)
    abs_BS = diff_BS.abs()
    log_ratio_B = diff_BS.sum(dim=1)  # 0 on a row without response tokens, which the row count leaves out
    tokens, abs_sum, above, rows, ratio_sum, ratio_sq_sum = reduce_scalars(
        [mask_BS.sum(), abs_BS.sum(), (abs_BS > ABOVE).sum(), mask_BS.any(dim=1).sum(), log_ratio_B.sum(), log_ratio_B.square().sum()],
        ps.group("dp"), device=ps.device)
    abs_max, ratio_abs_max = reduce_scalars([abs_BS.max() if abs_BS.numel() else 0.0, log_ratio_B.abs().max() if log_ratio_B.numel() else 0.0],
                                            ps.group("dp"), dist.ReduceOp.MAX, device=ps.device)
    tokens, rows = max(tokens, 1.0), max(rows, 1.0)
    mean_ratio = ratio_sum / rows
    return {
        "mismatch/logp_abs_diff_mean": abs_sum / tokens,
        "mismatch/logp_abs_diff_max": abs_max,
        "mismatch/logp_frac_above_1e-3": above / tokens,
        "mismatch/seq_log_ratio_std": math.sqrt(max(ratio_sq_sum / rows - mean_ratio ** 2, 0.0)),
        "mismatch/seq_log_ratio_abs_max": ratio_abs_max,
    }


def route_mismatch(chunks: list, ps: ParallelState) -> dict:
    """The ``mismatch/route_diff*`` metrics from the MoE layers' ``route_counts`` (counted since their
    ``reset_route_counts``) of this rank's ``chunks``; collective over the world, where every rank counts
    other (token, layer) pairs: its own rows (dp, ep), sequence chunk (tp, cp) and layers (pp)."""
    cfg = chunks[0].cfg
    layers = cfg.num_layers - cfg.num_dense_layers
    counts = [0.0] * (2 * layers)
    for chunk in chunks:
        for column, layer in chunk.moe_layers_by_column().items():
            if layer.route_counts is not None:
                counts[2 * column], counts[2 * column + 1] = layer.route_counts[0], layer.route_counts[1]
    counts = reduce_scalars(counts, ps.group("world"), device=ps.device)
    differing, compared = counts[0::2], counts[1::2]
    out = {f"mismatch/route_diff_layer{cfg.num_dense_layers + i}": d / max(c, 1.0) for i, (d, c) in enumerate(zip(differing, compared))}
    out["mismatch/route_diff_mean"] = sum(differing) / max(sum(compared), 1.0)
    return out
