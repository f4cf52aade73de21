"""Generalised advantage estimation for padded response batches (Seed1.5-Thinking / VAPO).

Shapes: ``B`` sequences, ``S`` token positions of the padded batch. A bool
``mask_BS`` marks the response tokens (the actions); prompt and padding positions are
ignored and pass the recursion through unchanged, so a mask with gaps (tool output
inside a multi-turn response) chains the response segments as one trajectory.

With ``t`` and ``t'`` consecutive response positions of one sequence (``t'`` the next
masked-in position after ``t``)::

    delta_t = r_t + gamma * V_t' - V_t
    A_t     = delta_t + gamma * lambda * A_t'
    R_t     = A_t + V_t                       (value target)

and after the last response token ``V = 0, A = 0`` (the episode ended), unless the
sequence was truncated (``truncated_B``): then ``V`` after the last token is the
critic's value of the state the generation was cut off in, ``V(prompt + whole
response)`` (``values_after_B``; :func:`values_after_response` reads it from the
critic's output one position past the last response token). The value *at* the last
response token is ``V`` of the state before that token was sampled, one step too early.

The reverse recursion ``A_t = d_t + c_t * A_t+1`` is a linear scan; :func:`reverse_linear_scan`
runs it chunked, in about ``2 sqrt(S)`` vectorised steps instead of ``S`` Python iterations,
equal to the loop to float64 rounding (``benchmarks/bench_gae.py`` measures both).

Decoupled GAE: value targets use ``lambda_value`` (1.0 = Monte-Carlo returns when
``gamma = 1``, unbiased targets for the critic), advantages use ``lambda_policy``
(0.95 = lower variance for the actor). Length-adaptive GAE: ``lambda_policy`` per
sequence is ``1 - 1 / (alpha * l)`` with ``l`` that sequence's response length,
clamped to ``[0, 1]``, so that the sum of GAE weights ``1 / (1 - lambda)`` grows as
``alpha * l`` and long responses are not biased towards the critic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_seed.config import ConfigError, RLConfig
from megatron_seed.parallel.mappings import all_reduce_no_grad
from megatron_seed.parallel.state import Group


def _check_batch(mask_BS: torch.Tensor, **tensors: torch.Tensor) -> None:
    if mask_BS.dim() != 2 or mask_BS.dtype != torch.bool:
        raise ValueError(f"mask_BS must be a 2-D bool tensor [B, S], got shape {tuple(mask_BS.shape)} dtype {mask_BS.dtype}; "
                         "fix: pass response_mask.bool()")
    for name, t in tensors.items():
        if t.shape != mask_BS.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask_BS has {tuple(mask_BS.shape)}; fix: pad both to [B, S]")


def response_lengths(mask_BS: torch.Tensor) -> torch.Tensor:
    """Number of response tokens per sequence, ``[B]`` int64."""
    return mask_BS.sum(dim=1)


def place_terminal_reward(reward_B: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """Per-token rewards ``[B, S]``: ``reward_B[b]`` at the last response token of ``b``, 0 elsewhere.

    Outcome rewards (verifier, reward model) score the whole response; GAE then
    propagates that terminal reward back through the tokens.
    """
    _check_batch(mask_BS)
    if reward_B.shape != (mask_BS.shape[0],):
        raise ValueError(f"reward_B has shape {tuple(reward_B.shape)}; expected [{mask_BS.shape[0]}] (one reward per sequence)")
    lengths_B = response_lengths(mask_BS)
    if bool((lengths_B == 0).any()):
        empty = torch.nonzero(lengths_B == 0).flatten().tolist()
        raise ValueError(f"sequences {empty} have no response tokens, so their reward has nowhere to go; fix: drop them from the batch")
    positions_S = torch.arange(mask_BS.shape[1], device=mask_BS.device)
    last_B = torch.where(mask_BS, positions_S, -1).amax(dim=1)
    rewards_BS = torch.zeros(mask_BS.shape, dtype=reward_B.dtype, device=reward_B.device)
    rewards_BS[torch.arange(mask_BS.shape[0], device=mask_BS.device), last_B] = reward_B
    return rewards_BS


def length_adaptive_lambda(lengths_B: torch.Tensor, alpha: float) -> torch.Tensor:
    """``lambda_B = clamp(1 - 1 / (alpha * l_B), 0, 1)``; an empty response gets 0."""
    if alpha <= 0:
        raise ConfigError(f"alpha={alpha}: must be > 0 (rl.length_alpha)")
    lengths_B = lengths_B.to(torch.float64)
    lam_B = 1.0 - 1.0 / (alpha * lengths_B.clamp(min=1e-12))
    return lam_B.clamp(0.0, 1.0)


def values_after_response(values_BS: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """``[B]``: the critic's value one position past each row's last response token.

    In training layout (:mod:`rl.experience`) the critic's output at position ``s`` is
    ``V(tokens[:s+1])``, so the value of the whole response ``tokens[:last+2]`` sits at
    ``last + 1``, whose input is the last response token. A row whose last response token
    is the batch's last column has no such position: append one
    (:func:`rl.experience.append_bootstrap_column`) before the critic runs.
    """
    _check_batch(mask_BS, values_BS=values_BS)
    S = mask_BS.shape[1]
    last_B = torch.where(mask_BS, torch.arange(S, device=mask_BS.device), -1).amax(dim=1)
    if bool((last_B + 1 >= S).any()):
        rows = torch.nonzero(last_B + 1 >= S).flatten().tolist()
        raise ValueError(f"rows {rows} end their response in the last column ({S - 1}), so no value after the last token "
                         "was computed; fix: rl.experience.append_bootstrap_column(batch) before the critic's forward")
    return values_BS.gather(1, (last_B + 1)[:, None])[:, 0]


def reverse_linear_scan(deltas_BS: torch.Tensor, decays_BS: torch.Tensor) -> torch.Tensor:
    """``A_t = d_t + c_t * A_t+1`` for ``t = S-1 .. 0`` with ``A_S = 0``, along dim 1.

    Chunked: ``S`` is cut into ``n`` chunks of ``C ~ sqrt(S)`` positions. One reverse loop
    over the ``C`` offsets runs every chunk at once, giving each chunk's local scan
    ``a_t`` (carry 0 at its end) and the decay products ``p_t = c_t * ... * c_end``; a loop
    over the ``n`` chunks carries ``A`` at each chunk's start into the chunk before; then
    ``A_t = a_t + p_t * A_(start of the next chunk)``. ``C + n`` Python steps instead of
    ``S``; the same products and sums as the loop up to float64 rounding.
    """
    B, S = deltas_BS.shape
    C = max(1, math.isqrt(S))
    n = -(-S // C)
    pad = n * C - S  # padded positions: d = 0, c = 1 (pass the carry through)
    d_BNC = torch.cat([deltas_BS, deltas_BS.new_zeros(B, pad)], dim=1).view(B, n, C)
    c_BNC = torch.cat([decays_BS, decays_BS.new_ones(B, pad)], dim=1).view(B, n, C)
    local_BNC, prod_BNC = torch.empty_like(d_BNC), torch.empty_like(c_BNC)
    carry_BN, prod_BN = d_BNC.new_zeros(B, n), c_BNC.new_ones(B, n)
    for t in range(C - 1, -1, -1):
        carry_BN = torch.addcmul(d_BNC[:, :, t], c_BNC[:, :, t], carry_BN)
        local_BNC[:, :, t] = carry_BN
        prod_BN = prod_BN * c_BNC[:, :, t]
        prod_BNC[:, :, t] = prod_BN
    next_start_BN = d_BNC.new_zeros(B, n)  # A at the start of chunk j + 1
    carry_B = d_BNC.new_zeros(B)
    for j in range(n - 1, -1, -1):
        next_start_BN[:, j] = carry_B
        carry_B = local_BNC[:, j, 0] + prod_BNC[:, j, 0] * carry_B
    return torch.addcmul(local_BNC, prod_BNC, next_start_BN[:, :, None]).view(B, n * C)[:, :S]


def gae(
    rewards_BS: torch.Tensor,
    values_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    gamma: float,
    lam: Union[float, torch.Tensor],
    truncated_B: Optional[torch.Tensor] = None,
    values_after_B: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """GAE advantages ``A_BS`` (formula in the module docstring); 0 outside the mask.

    ``lam`` is a float or a per-sequence ``[B]`` tensor. ``values_after_B`` (``[B]``,
    :func:`values_after_response`) is the bootstrap of the rows marked in ``truncated_B``
    and is needed when any is. Computed in float64 and returned in ``values_BS.dtype``.
    Vectorised: the next response value of every position is gathered in one shot, then
    :func:`reverse_linear_scan` runs ``A_t = d_t + c_t * A_t'`` with ``c_t = gamma * lambda``
    on response tokens and ``c_t = 1, d_t = 0`` elsewhere (the carry passes through gaps
    and padding). Values outside the mask are never read, so padding may hold anything
    (even NaN).
    """
    _check_batch(mask_BS, rewards_BS=rewards_BS, values_BS=values_BS)
    B, S = mask_BS.shape
    device = values_BS.device
    f64 = torch.float64
    rewards = torch.where(mask_BS, rewards_BS.to(f64), 0.0)
    values = torch.where(mask_BS, values_BS.to(f64), 0.0)

    # Value after the last response token: 0 (the episode ended), or the bootstrap when truncated.
    end_value_B = torch.zeros(B, dtype=f64, device=device)
    if truncated_B is not None:
        if truncated_B.shape != (B,):
            raise ValueError(f"truncated_B has shape {tuple(truncated_B.shape)}; expected [{B}] bools")
        if bool(truncated_B.any()):
            if values_after_B is None or values_after_B.shape != (B,):
                got = None if values_after_B is None else tuple(values_after_B.shape)
                raise ValueError(f"truncated rows need values_after_B [{B}] (the critic's value after the last response "
                                 f"token) to bootstrap from, got {got}; fix: pass rl.advantage.values_after_response(...)")
            end_value_B = torch.where(truncated_B.bool(), values_after_B.to(f64), 0.0)

    # Index of the next response position strictly after t (S = past the end).
    positions_S = torch.arange(S, device=device)
    idx_BS = torch.where(mask_BS, positions_S, S)
    next_idx_BS = torch.cat([idx_BS[:, 1:], torch.full((B, 1), S, device=device)], dim=1)
    next_idx_BS = next_idx_BS.flip(1).cummin(dim=1).values.flip(1)
    values_ext = torch.cat([values, end_value_B[:, None]], dim=1)
    next_values_BS = values_ext.gather(1, next_idx_BS)

    lam_B = torch.as_tensor(lam, dtype=f64, device=device)
    if lam_B.dim() > 1 or lam_B.numel() not in (1, B):
        raise ValueError(f"lam has shape {tuple(lam_B.shape)}; pass a float or one lambda per sequence [{B}]")
    lam_B = lam_B.expand(B)
    deltas_BS = torch.where(mask_BS, rewards + gamma * next_values_BS - values, 0.0)
    decay_BS = torch.where(mask_BS, gamma * lam_B[:, None], 1.0)
    advantages = reverse_linear_scan(deltas_BS, decay_BS)
    return torch.where(mask_BS, advantages, 0.0).to(values_BS.dtype)


def masked_whiten(x_BS: torch.Tensor, mask_BS: torch.Tensor, group: Group = None, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked-in entries of the whole batch; 0 elsewhere.

    ``mean`` and the unbiased ``var`` are taken over every valid token of every rank
    of ``group`` (two all-reduces), so the result equals one process whitening the
    concatenated batch.
    """
    _check_batch(mask_BS, x_BS=x_BS)
    x = torch.where(mask_BS, x_BS.detach().to(torch.float64), 0.0)
    stats = torch.stack([x.sum(), mask_BS.sum().to(torch.float64)])
    total, count = all_reduce_no_grad(stats, group).tolist()
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens in the batch, got {int(count)}; fix: set rl.whiten_advantages=false")
    mean = total / count
    sq = torch.where(mask_BS, (x - mean) ** 2, 0.0).sum().reshape(1)
    var = all_reduce_no_grad(sq, group).item() / (count - 1)
    out = (x - mean) / (var + eps) ** 0.5
    return torch.where(mask_BS, out, 0.0).to(x_BS.dtype)


@dataclass
class Advantages:
    """Output of :func:`compute_advantages`."""

    advantages_BS: torch.Tensor  # lambda_policy GAE, whitened if asked; 0 outside the mask
    returns_BS: torch.Tensor  # value targets: lambda_value GAE + V; 0 outside the mask
    lambda_policy_B: torch.Tensor  # the lambda used per sequence (float64)


def compute_advantages(
    rewards_BS: torch.Tensor,
    values_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    cfg: RLConfig,
    truncated_B: Optional[torch.Tensor] = None,
    dp_group: Group = None,
    values_after_B: Optional[torch.Tensor] = None,
) -> Advantages:
    """Decoupled (and, with ``cfg.length_adaptive``, length-adaptive) GAE for one rollout batch.

    Reads ``gamma``, ``lambda_value``, ``lambda_policy``, ``length_adaptive``,
    ``length_alpha`` and ``whiten_advantages`` from ``cfg``. Whitening statistics are
    reduced over ``dp_group`` (None = this process holds the whole batch). Rows marked in
    ``truncated_B`` bootstrap from ``values_after_B`` (see :func:`gae`).
    """
    values_BS = values_BS.detach()
    B = mask_BS.shape[0]
    if cfg.length_adaptive:
        lam_policy_B = length_adaptive_lambda(response_lengths(mask_BS), cfg.length_alpha)
    else:
        lam_policy_B = torch.full((B,), cfg.lambda_policy, dtype=torch.float64, device=mask_BS.device)
    advantages_BS = gae(rewards_BS, values_BS, mask_BS, cfg.gamma, lam_policy_B, truncated_B, values_after_B)
    value_advantages_BS = gae(rewards_BS, values_BS, mask_BS, cfg.gamma, cfg.lambda_value, truncated_B, values_after_B)
    returns_BS = torch.where(mask_BS, value_advantages_BS + values_BS, 0.0)
    if cfg.whiten_advantages:
        advantages_BS = masked_whiten(advantages_BS, mask_BS, dp_group)
    return Advantages(advantages_BS, returns_BS, lam_policy_B)
