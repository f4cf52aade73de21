"""Value pretraining: fit the critic to Monte-Carlo returns of a fixed policy before PPO.

Seed1.5-Thinking (after VAPO) starts PPO with a critic that already predicts the
returns of the initial (SFT) policy; a randomly initialised critic would feed the
first PPO steps with biased advantages. Each step:

1. ``sampler(step)`` returns a fresh batch of scored rollouts of the fixed policy in
   training layout (:mod:`rl.experience`; e.g. :func:`engine_sampler`);
2. value targets are GAE returns with ``lambda = 1`` and ``rl.gamma``: the Monte-Carlo
   return, i.e. the sequence's terminal reward discounted to every response token
   (never bootstrapped: a truncated response is scored as it stands, so its episode
   ended too);
3. one optimizer step of the plain (unclipped) value loss.

The reported ``value_loss`` and ``explained_variance`` (``1 - Var[R - V] / Var[R]``) are
measured on the step's fresh batch *before* the critic trains on it: a held-out
estimate. Stopping rule: after ``max_steps`` steps, or once neither the value loss has
dropped below its best by more than ``min_delta`` nor the explained variance risen above
its best by more than ``min_delta`` for ``patience`` consecutive steps. A batch whose
returns are all equal (e.g. every response wrong) still trains the critic towards that
value, but its explained variance is undefined: it is reported as None (null in the
metrics file) and does not count for the stopping rule.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_seed.config import ConfigError, RLConfig
from megatron_seed.parallel import context_parallel
from megatron_seed.train.trainer import Trainer
from rl.advantage import compute_advantages, place_terminal_reward
from rl.experience import check_experience, from_rollout, pad_columns, sample_and_score
from rl.packing import pack, plan_step
from rl.ppo import critic_loss_spec, critic_values, trained_mask, without_routes


@dataclass
class PlateauStopper:
    """The stopping rule of the module docstring."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_ev: float = -math.inf
    stale: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1 or self.min_delta < 0:
            raise ConfigError(f"value pretraining: patience={self.patience} must be >= 1 and min_delta={self.min_delta} >= 0 "
                              "(rl.value_pretrain_patience / rl.value_pretrain_min_delta)")

    def update(self, value_loss: float, explained_variance: Optional[float]) -> bool:
        """Record one step; True when training should stop."""
        improved = False
        if value_loss < self.best_loss - self.min_delta:
            self.best_loss, improved = value_loss, True
        if explained_variance is not None and math.isfinite(explained_variance) and explained_variance > self.best_ev + self.min_delta:
            self.best_ev, improved = explained_variance, True
        self.stale = 0 if improved else self.stale + 1
        return self.stale >= self.patience


def monte_carlo_returns(batch: dict, values_BS, cfg: RLConfig, dp_group=None):
    """Value targets with ``lambda_value = 1`` and ``rl.gamma`` (Monte-Carlo returns), ``[B, S]``."""
    mc = dataclasses.replace(cfg, lambda_value=1.0, whiten_advantages=False, length_adaptive=False)
    rewards_BS = place_terminal_reward(batch["rewards_B"].float(), batch["mask_BS"])
    # no bootstrap for truncated rows: their outcome reward scores the cut response, so the episode did end there
    return compute_advantages(rewards_BS, values_BS, batch["mask_BS"], mc, None, dp_group).returns_BS


def value_pretrain(
    critic: Trainer,
    sampler: Callable[[int], dict],
    cfg: RLConfig,
    max_steps: Optional[int] = None,
    log: Optional[Callable[[int, dict], None]] = None,
) -> list:
    """Fit ``critic`` to Monte-Carlo returns of ``sampler``'s rollouts; returns the per-step metrics.

    ``max_steps`` defaults to ``rl.value_pretrain_steps``; patience and min-delta come from
    ``rl.value_pretrain_patience`` / ``rl.value_pretrain_min_delta``. ``log(step, metrics)``
    is called after every step (metrics live on the last pipeline stage).
    """
    stopper = PlateauStopper(cfg.value_pretrain_patience, cfg.value_pretrain_min_delta)
    history: list = []
    for step in range(cfg.value_pretrain_steps if max_steps is None else max_steps):
        metrics = value_pretrain_step(critic, sampler(step), cfg)
        metrics["step"] = step
        history.append(metrics)
        if log is not None:
            log(step, metrics)
        if stopper.update(metrics["value_loss"], metrics["explained_variance"]):  # same metrics on every rank
            break
    return history


def value_pretrain_step(critic: Trainer, batch: dict, cfg: RLConfig) -> dict:
    """Steps 2-3 of the module docstring on one batch of scored rollouts; the critic's metrics (every rank)."""
    ps = critic.ps
    batch = without_routes(pad_columns(batch, context_parallel.sequence_multiple(ps)))  # the critic routes by its own router
    check_experience(batch)
    layout = None
    if critic.cfg.train.max_tokens_per_micro_batch is not None:  # packed, dp-token-balanced micro-batches (rl.packing)
        batch, layout = plan_step(batch, ps, 1, critic.cfg.train.max_tokens_per_micro_batch)
    values_BS = critic_values(critic, batch, layout)
    if ps.is_last_stage:
        batch["old_values_BS"] = values_BS
        batch["returns_BS"] = monte_carlo_returns(batch, values_BS, cfg, ps.group("dp")).float()
    else:  # earlier stages only forward activations
        batch["old_values_BS"] = batch["returns_BS"] = batch["mask_BS"].float() * 0
    batch["mask_BS"] = trained_mask(batch)  # after the returns: a failed score trains nothing
    steps_on = batch if layout is None else pack(batch, layout.micro_batches, layout.width)
    metrics = critic.train_step(steps_on, critic_loss_spec(None, cfg.loss_agg))
    if not math.isfinite(metrics.get("explained_variance", 0.0)):
        metrics["explained_variance"] = None  # constant returns: 1 - Var[R - V] / Var[R] is 0 / 0
    return metrics


def engine_sampler(engine, prompts: Callable[[int], Sequence], router, tokenizer, n: Optional[int] = None,
                   system: Optional[str] = None) -> Callable[[int], dict]:
    """A ``sampler`` for :func:`value_pretrain` from a :class:`rl.rollout.engine.RolloutEngine`:
    ``prompts(step)`` gives the step's :class:`data.prompts.PromptRecord` s, each sampled
    ``n`` times and scored by ``router`` (:func:`rl.experience.sample_and_score`)."""

    def sample(step: int) -> dict:
        rollout, results = sample_and_score(engine, list(prompts(step)), router, tokenizer, n, system)
        return from_rollout(rollout, [r.reward for r in results], [r.correct for r in results])

    return sample
