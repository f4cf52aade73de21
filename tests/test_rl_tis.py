"""Truncated importance sampling (``rl.tis_cap``): the loss is the hand formula, weights are 1 when the
log-probs agree, a planted rollout mismatch moves the PPO step's loss as the formula says, a bad cap is refused."""
import math

import numpy as np
import pytest
import torch

from megatron_seed.config import ConfigError, load_config
from megatron_seed.parallel.state import ParallelState
from rl.losses import LossNormalizer, policy_loss, truncated_is_weights
from tests.numerics import assert_close_rel
from tests.test_rl_ppo import build, ppo_config, synthetic_rollouts

CAP = 2.0


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, S = 4, 9
    old = -torch.rand(B, S, generator=g, dtype=torch.float64) * 3
    return {
        "logprobs_BS": old + 0.4 * torch.randn(B, S, generator=g, dtype=torch.float64),
        "old_logprobs_BS": old,
        "rollout_logprobs_BS": old + torch.randn(B, S, generator=g, dtype=torch.float64),  # some weights above the cap
        "advantages_BS": torch.randn(B, S, generator=g, dtype=torch.float64),
        "mask_BS": torch.rand(B, S, generator=g) < 0.7,
    }


def _hand_loss(x: dict, cap: float) -> float:
    """sum_t w_t * max(-A r, -A clip(r, 0.8, 1.28)) / N_tok with w = min(exp(old - rollout), cap), in numpy float64."""
    new, old, roll, adv = (x[k].numpy() for k in ("logprobs_BS", "old_logprobs_BS", "rollout_logprobs_BS", "advantages_BS"))
    mask = x["mask_BS"].numpy()
    r = np.exp(new - old)
    per_token = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.28)) * np.minimum(np.exp(old - roll), cap)
    return float((per_token * mask).sum() / mask.sum())


def test_loss_with_tis_equals_hand_formula_in_float64():
    x = _inputs()
    norm = LossNormalizer(float(x["mask_BS"].sum()), 4.0, 0.0, 0.0)
    loss, metrics = policy_loss(x["logprobs_BS"], x["old_logprobs_BS"], x["advantages_BS"], x["mask_BS"], norm, 0.2, 0.28,
                                rollout_logprobs_BS=x["rollout_logprobs_BS"], tis_cap=CAP)
    assert_close_rel(loss, _hand_loss(x, CAP), 1e-12)
    w = np.minimum(np.exp(x["old_logprobs_BS"] - x["rollout_logprobs_BS"]).numpy(), CAP)[x["mask_BS"].numpy()]
    assert 0 < (w == CAP).mean() < 1, "the inputs must exercise the cap and the uncapped weights"
    assert float(metrics["tis_weight"]) == pytest.approx(w.mean(), rel=1e-6)
    assert float(metrics["tis_capped_frac"]) == pytest.approx((w == CAP).mean(), rel=1e-12)


def test_weights_are_exactly_one_when_logprobs_agree_and_carry_no_gradient():
    x = _inputs(1)
    old = x["old_logprobs_BS"].float().requires_grad_()
    w = truncated_is_weights(old, old.detach().clone(), x["mask_BS"], CAP)
    assert torch.equal(w, torch.ones_like(w)) and not w.requires_grad
    norm = LossNormalizer(float(x["mask_BS"].sum()), 4.0, 0.0, 0.0)
    args = (x["logprobs_BS"], x["old_logprobs_BS"], x["advantages_BS"], x["mask_BS"], norm)
    with_tis, _ = policy_loss(*args, rollout_logprobs_BS=x["old_logprobs_BS"].clone(), tis_cap=CAP)
    without, _ = policy_loss(*args)
    assert torch.equal(with_tis, without)


def _first_update(tis_cap, planted_delta_BS=None) -> tuple:
    """One PPO step (one mini-batch, one epoch) whose behaviour log-probs are recomputed by the trainer while the
    batch carries the rollout's = the trainer's + ``planted_delta_BS``; ``(first actor update's metrics, prepared batch)``."""
    cfg = ppo_config({}, kl_coef=0.0, entropy_coef=0.0, lm_loss_coef=0.0, ppo_epochs=1, mini_batches=1, tis_cap=tis_cap)
    ppo = build(cfg, ParallelState.single())
    batch = synthetic_rollouts(seed=2)
    train_logprobs_BS = ppo.policy_logprobs(batch)
    batch["old_logprobs_BS"] = train_logprobs_BS + (0.0 if planted_delta_BS is None else planted_delta_BS)
    ppo.recompute_logprobs = True
    prepared, _ = ppo.prepare(dict(batch))
    ppo.step(batch)
    return ppo.updates[0]["actor"], prepared


def test_planted_rollout_mismatch_changes_the_ppo_loss_as_the_formula_says():
    shape = synthetic_rollouts(seed=2)["mask_BS"].shape
    # per token: rollout log-prob 0.3 lower (w = e^0.3), 0.5 higher (w = e^-0.5) or 1.5 lower (w = e^1.5 > cap: capped)
    delta_BS = torch.tensor([-0.3, 0.5, -1.5]).repeat(shape[0] * shape[1] // 3 + 1)[:shape[0] * shape[1]].view(shape)
    metrics, prepared = _first_update(CAP, delta_BS)
    mask_BS, adv_BS = prepared["mask_BS"], prepared["advantages_BS"].double()
    assert torch.equal(prepared["rollout_logprobs_BS"], prepared["old_logprobs_BS"] + delta_BS), "the rollout's log-probs are kept"
    w_BS = torch.exp(-delta_BS.double()).clamp(max=CAP)
    n = float(mask_BS.sum())
    # the first update sees the weights the behaviour log-probs came from: r = 1, so l = -A * w
    assert metrics["pg_loss"] == pytest.approx(float((-adv_BS * w_BS)[mask_BS].sum()) / n, rel=1e-5)
    assert metrics["tis_weight"] == pytest.approx(float(w_BS[mask_BS].mean()), rel=1e-5)
    assert metrics["tis_capped_frac"] == pytest.approx(float((delta_BS == -1.5)[mask_BS].double().mean()), rel=1e-12)
    plain, _ = _first_update(None, delta_BS)  # tis off: the planted mismatch does not reach the loss
    assert "tis_weight" not in plain
    assert plain["pg_loss"] == pytest.approx(float(-adv_BS[mask_BS].sum()) / n, rel=1e-5, abs=1e-7)
    assert not math.isclose(plain["pg_loss"], metrics["pg_loss"], rel_tol=1e-3)


@pytest.mark.parametrize("cap", ["1.0", "0.5", "-2"])
def test_a_cap_of_at_most_one_is_refused(cap):
    with pytest.raises(ConfigError, match=rf"rl\.tis_cap={cap}.*must be > 1"):
        load_config("tiny", overrides=[f"rl.tis_cap={cap}"])
    assert load_config("tiny", overrides=["rl.tis_cap=2.0"]).rl.tis_cap == 2.0
