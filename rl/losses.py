"""PPO losses of the Seed1.5-Thinking recipe on per-token log-probs ``[B, S]``.

Inputs are per-token log-probs of the sampled tokens (the model side computes them
vocab-parallel, without gathering logits) and a bool response mask ``mask_BS``.

Aggregation (``agg``) over the tokens of one optimizer step's global batch:

* ``token`` (default, Seed's token-level loss): ``sum_{b,t} x_bt / N_tok`` with
  ``N_tok`` the valid tokens of the global batch, so every token weighs the same
  whatever the length of the response it sits in;
* ``sequence``: ``sum_b (sum_t x_bt / l_b) / N_seq`` with ``l_b`` the response length
  and ``N_seq`` the non-empty sequences of the global batch.

The denominators ``N_tok`` / ``N_seq`` of one optimizer step are the global totals
of :func:`normalizer_units` (counted per micro-batch here, summed over the step's
micro-batches and the ``dp_cp`` ranks by :meth:`megatron_seed.train.trainer.Trainer.train_step`)
and reach every micro-batch's loss as a :class:`LossNormalizer`. Each micro-batch's
loss is then its share of the global loss: summing the micro-batch gradients and
all-reducing them with SUM over the data-parallel group gives exactly the
single-process gradient of the whole batch. Under context parallelism use ``token``:
``sequence`` needs whole sequences on one rank.

Every loss returns ``(loss, metrics)``. Metrics follow the same rule as the loss:
each is a detached 0-d tensor holding this micro-batch's share of the global-batch
value (a token mean: sum over this micro-batch's valid tokens / ``N_tok``), so their
sum over micro-batches and ranks is the exact global-batch number;
:func:`value_metrics` turns the summed moments of :func:`value_loss` into the
explained variance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_seed.config import ConfigError, RLConfig
from megatron_seed.parallel.mappings import reduce_scalars
from megatron_seed.parallel.state import Group

AGG_MODES = ("token", "sequence")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps a stale or corrupted log-prob from overflowing to inf


def _check(mask_BS: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    if mask_BS.dim() != 2 or mask_BS.dtype != torch.bool:
        raise ValueError(f"mask_BS must be a 2-D bool tensor [B, S], got shape {tuple(mask_BS.shape)} dtype {mask_BS.dtype}; "
                         "fix: pass response_mask.bool()")
    for name, t in tensors.items():
        if t is not None and t.shape != mask_BS.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask_BS has {tuple(mask_BS.shape)}; "
                             "fix: pass per-token values [B, S] (log-probs of the sampled tokens, not logits)")


def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ConfigError(f"agg={agg!r}: must be one of {', '.join(AGG_MODES)} (rl.loss_agg)")


@dataclass(frozen=True)
class LossNormalizer:
    """Global denominators of one optimizer step (see the module docstring)."""

    tokens: float  # response tokens of the global batch
    sequences: float  # sequences with at least one response token
    positive_tokens: float  # response tokens of the sequences marked positive (correct)
    positive_sequences: float

    def denominator(self, agg: str, positive: bool = False) -> float:
        """``N_tok`` (token) or ``N_seq`` (sequence), over all or only positive sequences; at least 1."""
        _check_agg(agg)
        if agg == "token":
            n = self.positive_tokens if positive else self.tokens
        else:
            n = self.positive_sequences if positive else self.sequences
        return max(n, 1.0)


    @classmethod
    def from_totals(cls, totals: dict) -> "LossNormalizer":
        """From the global totals of :func:`normalizer_units` (missing positive counts are 0)."""
        return cls(totals["tokens"], totals["sequences"], totals.get("positive_tokens", 0.0), totals.get("positive_sequences", 0.0))


def normalizer_units(mask_BS: torch.Tensor, positive_BS: Optional[torch.Tensor] = None,
                     doc_ids_BS: Optional[torch.Tensor] = None) -> dict:
    """One micro-batch's counts of the :class:`LossNormalizer` units: response ``tokens``,
    non-empty ``sequences`` and, given ``positive_BS`` (True on the tokens of sequences the
    reward marks correct), ``positive_tokens`` / ``positive_sequences``. A sequence is a row,
    or with ``doc_ids_BS`` (packed rows, :mod:`rl.packing`) one document of a row."""
    _check(mask_BS, positive_BS=positive_BS, doc_ids_BS=doc_ids_BS)
    units = {"tokens": mask_BS.sum().double(), "sequences": _count_sequences(mask_BS, doc_ids_BS)}
    if positive_BS is not None:
        positive_mask_BS = mask_BS & positive_BS.bool()
        units["positive_tokens"] = positive_mask_BS.sum().double()
        units["positive_sequences"] = _count_sequences(positive_mask_BS, doc_ids_BS)
    return units


def _count_sequences(mask_BS: torch.Tensor, doc_ids_BS: Optional[torch.Tensor]) -> torch.Tensor:
    """How many sequences (rows, or (row, document) pairs) have a token in ``mask_BS``."""
    if doc_ids_BS is None:
        return mask_BS.any(dim=1).double().sum()
    rows_BS = torch.arange(mask_BS.shape[0], device=mask_BS.device)[:, None].expand_as(mask_BS)
    pairs_N2 = torch.stack([rows_BS[mask_BS], doc_ids_BS[mask_BS]], dim=1)
    return torch.tensor(float(torch.unique(pairs_N2, dim=0).shape[0]), dtype=torch.float64, device=mask_BS.device)


def compute_normalizer(masks_BS: Sequence[torch.Tensor], positives_BS: Optional[Sequence[torch.Tensor]] = None) -> LossNormalizer:
    """The normaliser of micro-batches held by one process (a step without data parallelism)."""
    if positives_BS is not None and len(positives_BS) != len(masks_BS):
        raise ValueError(f"{len(positives_BS)} positive masks for {len(masks_BS)} micro-batches; pass one per micro-batch")
    totals: dict = {}
    for i, mask_BS in enumerate(masks_BS):
        for k, v in normalizer_units(mask_BS, None if positives_BS is None else positives_BS[i]).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return LossNormalizer.from_totals(totals)


def masked_aggregate(x_BS: torch.Tensor, mask_BS: torch.Tensor, agg: str, denominator: float) -> torch.Tensor:
    """This micro-batch's share of the global ``token`` or ``sequence`` aggregate of ``x_BS``."""
    _check_agg(agg)
    x_BS = torch.where(mask_BS, x_BS, 0.0)
    if agg == "token":
        return x_BS.sum() / denominator
    lengths_B = mask_BS.sum(dim=1).clamp(min=1).to(x_BS.dtype)
    return (x_BS.sum(dim=1) / lengths_B).sum() / denominator


def _token_share(x_BS: torch.Tensor, mask_BS: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """This micro-batch's share of the global token mean of ``x_BS`` (a metric, float64, no grad)."""
    return torch.where(mask_BS, x_BS.detach().double(), 0.0).sum() / max(norm.tokens, 1.0)


def _log_ratio(logprobs_BS: torch.Tensor, old_logprobs_BS: torch.Tensor) -> torch.Tensor:
    return (logprobs_BS - old_logprobs_BS).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def k3_kl(logprobs_BS: torch.Tensor, ref_logprobs_BS: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of ``KL(pi || pi_ref)`` on samples from ``pi``: ``e^d - d - 1``, ``d = log pi_ref - log pi``.

    Non-negative and unbiased (Schulman's k3); the gradient flows through ``logprobs_BS``.
    """
    d = (ref_logprobs_BS - logprobs_BS).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(d) - d - 1.0


def truncated_is_weights(old_logprobs_BS: torch.Tensor, rollout_logprobs_BS: torch.Tensor, mask_BS: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights ``w = min(pi_old / pi_rollout, cap) = min(exp(log pi_old - log pi_rollout), cap)``
    per token (detached; 1 outside ``mask_BS``).

    ``pi_old`` is the training forward's behaviour policy (recomputed by the trainer), ``pi_rollout``
    the distribution the engine actually sampled from (another engine, or a bf16 copy of the
    weights): the PPO surrogate is an expectation under ``pi_old``, the tokens come from
    ``pi_rollout``, and ``w`` corrects for that, truncated at ``cap`` so a token the rollout
    under-sampled cannot take over the batch (Yao et al., "Your efficient RL framework secretly
    brings you off-policy RL training"). Equal log-probs give weights of exactly 1.
    """
    _check(mask_BS, old_logprobs_BS=old_logprobs_BS, rollout_logprobs_BS=rollout_logprobs_BS)
    if cap <= 1:
        raise ConfigError(f"tis_cap={cap}: must be > 1 (rl.tis_cap)")
    dtype = torch.promote_types(old_logprobs_BS.dtype, torch.float32)  # at least fp32: a bf16 exp would round w by ~0.4%
    log_w_BS = _log_ratio(old_logprobs_BS.detach().to(dtype), rollout_logprobs_BS.detach().to(dtype))
    return torch.where(mask_BS, torch.exp(log_w_BS).clamp(max=cap), 1.0)


def policy_loss(
    logprobs_BS: torch.Tensor,
    old_logprobs_BS: torch.Tensor,
    advantages_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    norm: LossNormalizer,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: Optional[float] = None,
    agg: str = "token",
    rollout_logprobs_BS: Optional[torch.Tensor] = None,
    tis_cap: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped PPO surrogate with clip-higher, optional dual clip and optional truncated importance sampling.

    ``r = exp(log pi - log pi_old)``, per token::

        l = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))
        l = min(l, -A * dual_clip)            if A < 0 and dual_clip is set
        l = w * l                             w = min(pi_old / pi_rollout, tis_cap)   (:func:`truncated_is_weights`)

where truncated importance sampling applies only with both ``rollout_logprobs_BS`` (the
log-probs the rollout engine sampled with) and ``tis_cap``.

    then aggregated with ``agg`` over ``norm.denominator(agg)``.
    ``eps_high > eps_low`` (clip-higher, DAPO) leaves room for low-probability tokens
    to grow, which keeps entropy from collapsing. The dual clip bounds the loss of a
    negative-advantage token whose ratio exploded at ``dual_clip * |A|``.

    Metrics: ``clip_frac_high`` (A > 0 and r > 1 + eps_high: upper clip active),
    ``clip_frac_low`` (A < 0 and r < 1 - eps_low), ``dual_clip_frac`` (A < 0 and the
    dual bound active), ``approx_kl`` (k3 of ``KL(pi_old || pi)``: ``r - 1 - log r``),
    ``ratio``, ``pg_loss`` (token mean); with truncated importance sampling, ``tis_weight``
    (token mean of ``w``) and ``tis_capped_frac`` (tokens whose weight is the cap).
    """
    _check(mask_BS, logprobs_BS=logprobs_BS, old_logprobs_BS=old_logprobs_BS, advantages_BS=advantages_BS)
    if not (0 < eps_low < 1 and eps_high > 0):
        raise ConfigError(f"eps_low={eps_low}, eps_high={eps_high}: need 0 < eps_low < 1 and eps_high > 0 (rl.eps_low / rl.eps_high)")
    if dual_clip is not None and dual_clip <= 1:
        raise ConfigError(f"dual_clip={dual_clip}: must be > 1 or None (rl.dual_clip)")
    # detached inputs are zeroed outside the mask so padding garbage cannot reach a gradient as 0 * NaN
    adv = torch.where(mask_BS, advantages_BS.detach().to(logprobs_BS.dtype), 0.0)
    old_logprobs = torch.where(mask_BS, old_logprobs_BS.detach().to(logprobs_BS.dtype), logprobs_BS.detach())
    log_ratio = _log_ratio(logprobs_BS, old_logprobs)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_BS = torch.maximum(loss_unclipped, loss_clipped)
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual_active = (adv < 0) & (loss_BS > dual_bound)
        loss_BS = torch.where(adv < 0, torch.minimum(loss_BS, dual_bound), loss_BS)
    else:
        dual_active = torch.zeros_like(mask_BS)
    tis_weights_BS = None
    if tis_cap is not None and rollout_logprobs_BS is not None:
        tis_weights_BS = truncated_is_weights(old_logprobs, rollout_logprobs_BS, mask_BS, tis_cap)
        loss_BS = loss_BS * tis_weights_BS.to(loss_BS.dtype)
    loss = masked_aggregate(loss_BS, mask_BS, agg, norm.denominator(agg))
    with torch.no_grad():
        metrics = {
            "pg_loss": _token_share(loss_BS, mask_BS, norm),
            "clip_frac_high": _token_share((adv > 0) & (ratio > 1.0 + eps_high), mask_BS, norm),
            "clip_frac_low": _token_share((adv < 0) & (ratio < 1.0 - eps_low), mask_BS, norm),
            "dual_clip_frac": _token_share(dual_active, mask_BS, norm),
            "approx_kl": _token_share(ratio - 1.0 - log_ratio, mask_BS, norm),
            "ratio": _token_share(ratio, mask_BS, norm),
        }
        if tis_weights_BS is not None:
            metrics["tis_weight"] = _token_share(tis_weights_BS, mask_BS, norm)
            metrics["tis_capped_frac"] = _token_share(tis_weights_BS == tis_cap, mask_BS, norm)
    return loss, metrics


def positive_lm_loss(
    logprobs_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    positive_BS: torch.Tensor,
    norm: LossNormalizer,
    agg: str = "token",
) -> torch.Tensor:
    """NLL ``-log pi`` on the response tokens of sequences marked positive (correct), aggregated with ``agg``.

    The denominator is ``norm.denominator(agg, positive=True)``: the loss is the mean
    NLL over the positive tokens (or positive sequences) of the global batch.
    Negative samples contribute nothing.
    """
    _check(mask_BS, logprobs_BS=logprobs_BS, positive_BS=positive_BS)
    positive_mask_BS = mask_BS & positive_BS.bool()
    return masked_aggregate(-logprobs_BS, positive_mask_BS, agg, norm.denominator(agg, positive=True))


def actor_loss(
    logprobs_BS: torch.Tensor,
    old_logprobs_BS: torch.Tensor,
    advantages_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    norm: LossNormalizer,
    cfg: RLConfig,
    positive_BS: Optional[torch.Tensor] = None,
    ref_logprobs_BS: Optional[torch.Tensor] = None,
    entropy_BS: Optional[torch.Tensor] = None,
    rollout_logprobs_BS: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict]:
    """The full actor objective of one micro-batch::

        L = L_ppo + mu * L_nll(positives) + kl_coef * agg(k3 KL to pi_ref) - entropy_coef * agg(H)

    with ``mu = cfg.lm_loss_coef`` and the clip settings and ``agg`` from ``cfg``.
    ``positive_BS`` (True on the tokens of sequences marked correct) is needed when ``mu > 0``, ``ref_logprobs_BS`` when ``kl_coef > 0``,
    ``entropy_BS`` (per-token entropies of pi, vocab-parallel on the model side) when
    ``entropy_coef > 0``; entropies are also reported when given. ``rollout_logprobs_BS`` (the
    rollout engine's own log-probs, when ``old_logprobs_BS`` were recomputed by the trainer)
    turns on truncated importance sampling of ``L_ppo`` at ``cfg.tis_cap`` (when set).
    """
    agg = cfg.loss_agg
    denominator = norm.denominator(agg)
    loss, metrics = policy_loss(logprobs_BS, old_logprobs_BS, advantages_BS, mask_BS, norm,
                                cfg.eps_low, cfg.eps_high, cfg.dual_clip, agg, rollout_logprobs_BS, cfg.tis_cap)
    if cfg.lm_loss_coef > 0:
        if positive_BS is None:
            raise ValueError("rl.lm_loss_coef > 0 needs positive_BS (the tokens of the samples the reward marks correct); "
                             "pass it or set rl.lm_loss_coef=0")
        lm = positive_lm_loss(logprobs_BS, mask_BS, positive_BS, norm, agg)
        loss = loss + cfg.lm_loss_coef * lm
        metrics["lm_loss"] = lm.detach()
    if cfg.kl_coef > 0 or ref_logprobs_BS is not None:
        if ref_logprobs_BS is None:
            raise ValueError("rl.kl_coef > 0 needs ref_logprobs_BS from the reference policy; pass them or set rl.kl_coef=0")
        _check(mask_BS, ref_logprobs_BS=ref_logprobs_BS)
        kl_BS = k3_kl(logprobs_BS, ref_logprobs_BS.detach())
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * masked_aggregate(kl_BS, mask_BS, agg, denominator)
        metrics["kl_ref"] = _token_share(kl_BS, mask_BS, norm)
    if cfg.entropy_coef > 0 or entropy_BS is not None:
        if entropy_BS is None:
            raise ValueError("rl.entropy_coef > 0 needs entropy_BS (per-token policy entropies); pass them or set rl.entropy_coef=0")
        _check(mask_BS, entropy_BS=entropy_BS)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * masked_aggregate(entropy_BS, mask_BS, agg, denominator)
        metrics["entropy"] = _token_share(entropy_BS, mask_BS, norm)
    return loss, metrics


_EV_MOMENTS = ("ev/returns", "ev/returns_sq", "ev/residual", "ev/residual_sq")


def _explained_variance_from_moments(r: float, rr: float, e: float, ee: float) -> float:
    """``1 - Var[e] / Var[R]`` from token means of ``R, R^2, e = R - V, e^2``; NaN when the returns are constant."""
    var_r = rr - r * r
    return 1.0 - (ee - e * e) / var_r if var_r > 0 else float("nan")


def explained_variance(values_BS: torch.Tensor, returns_BS: torch.Tensor, mask_BS: torch.Tensor, group: Group = None) -> float:
    """``1 - Var[R - V] / Var[R]`` over the valid tokens of every rank of ``group`` (1 = perfect critic, 0 = no better than the mean)."""
    _check(mask_BS, values_BS=values_BS, returns_BS=returns_BS)
    r = torch.where(mask_BS, returns_BS.detach().double(), 0.0)
    e = torch.where(mask_BS, (returns_BS.detach() - values_BS.detach()).double(), 0.0)
    n, *moments = reduce_scalars([mask_BS.sum(), r.sum(), (r * r).sum(), e.sum(), (e * e).sum()], group, device=mask_BS.device)
    return _explained_variance_from_moments(*(m / max(n, 1.0) for m in moments))


def value_loss(
    values_BS: torch.Tensor,
    old_values_BS: torch.Tensor,
    returns_BS: torch.Tensor,
    mask_BS: torch.Tensor,
    norm: LossNormalizer,
    clip: Optional[float] = 0.2,
    agg: str = "token",
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``, aggregated with ``agg``.

    ``clip=None`` gives the plain ``0.5 * (V - R)^2``. Metrics: ``value_loss`` (token
    mean), ``value_clip_frac`` (tokens where the clipped term is the larger, so no
    gradient flows), ``values`` and ``returns`` means, and the moments
    :func:`reduce_metrics` turns into ``explained_variance``.
    """
    _check(mask_BS, values_BS=values_BS, old_values_BS=old_values_BS, returns_BS=returns_BS)
    returns = torch.where(mask_BS, returns_BS.detach().to(values_BS.dtype), values_BS.detach())
    loss_BS = (values_BS - returns) ** 2
    if clip is not None:
        if clip <= 0:
            raise ConfigError(f"value clip={clip}: must be > 0 or None (rl.value_clip)")
        old = torch.where(mask_BS, old_values_BS.detach().to(values_BS.dtype), values_BS.detach())
        clipped_BS = (old + (values_BS - old).clamp(-clip, clip) - returns) ** 2
        clip_active = clipped_BS > loss_BS
        loss_BS = torch.maximum(loss_BS, clipped_BS)
    else:
        clip_active = torch.zeros_like(mask_BS)
    loss_BS = 0.5 * loss_BS
    loss = masked_aggregate(loss_BS, mask_BS, agg, norm.denominator(agg))
    with torch.no_grad():
        residual = returns - values_BS
        metrics = {
            "value_loss": _token_share(loss_BS, mask_BS, norm),
            "value_clip_frac": _token_share(clip_active, mask_BS, norm),
            "values": _token_share(values_BS, mask_BS, norm),
            "returns": _token_share(returns, mask_BS, norm),
        }
        for name, x in zip(_EV_MOMENTS, (returns, returns * returns, residual, residual * residual)):
            metrics[name] = _token_share(x, mask_BS, norm)
    return loss, metrics


def value_metrics(sums: dict) -> dict:
    """Reported critic metrics from summed shares: the moments of :func:`value_loss` become ``explained_variance``."""
    out = dict(sums)
    if all(k in out for k in _EV_MOMENTS):
        out["explained_variance"] = _explained_variance_from_moments(*(out.pop(k) for k in _EV_MOMENTS))
    return out
