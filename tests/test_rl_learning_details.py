"""Details that decide whether RL learns: behaviour log-probs at the sampling temperature, value
pretraining on a batch without return variance, DAPO's zero-variance group filter, lambda_policy logged."""
import dataclasses
import math

import pytest
import torch

from megatron_seed.config import RLConfig, RolloutConfig
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer
from rl.experience import drop_zero_variance_groups, from_rollout, from_sequences
from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config
from rl.rollout.engine import RolloutEngine
from rl.value_pretrain import value_pretrain
from tests.model_utils import tiny_config, tiny_model

PROMPTS = [[5, 9, 2], [7, 3], [11, 4, 8, 1]]


def _trainers(temperature_rl: RLConfig = RLConfig()):
    cfg = tiny_config(tiny_model(), micro_batch_size=3)
    cfg.rl = dataclasses.replace(temperature_rl, actor_lr=1e-3, critic_lr=1e-3)
    ps = ParallelState.single()
    actor, critic = Trainer(rl_trainer_config(cfg, "actor", 6), ps), Trainer(rl_trainer_config(cfg, "critic", 6), ps)
    init_critic_from_actor(critic, actor)
    return cfg, ps, actor, critic


@pytest.mark.timeout(120)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_behaviour_log_probs_are_those_of_the_tempered_policy_the_trainer_recomputes(temperature):
    cfg, ps, actor, critic = _trainers()
    engine = RolloutEngine(actor.chunks, ps, RolloutConfig(max_new_tokens=6, temperature=temperature), stop_ids=[0], pad_id=0, seed=1)
    rollout = engine.generate(PROMPTS, n=2)
    batch = from_rollout(rollout, [1.0, 0.0] * 3, [True, False] * 3)
    mask = batch["mask_BS"]
    tempered = PPOTrainer(actor, critic, cfg.rl, temperature=temperature).policy_logprobs(batch)
    untempered = PPOTrainer(actor, critic, cfg.rl).policy_logprobs(batch)
    old = batch["old_logprobs_BS"]
    assert ((tempered - old)[mask].norm() / old[mask].norm()).item() <= 1e-5  # the first PPO ratio is 1
    assert ((untempered - old)[mask].norm() / old[mask].norm()).item() > 1e-2  # at T=1 it would not be
    metrics = PPOTrainer(actor, critic, dataclasses.replace(cfg.rl, ppo_epochs=1), temperature=temperature).step(batch)
    assert metrics["actor/clip_frac_low"] == 0.0 and metrics["actor/clip_frac_high"] == 0.0


@pytest.mark.timeout(120)
def test_value_pretraining_on_constant_returns_reports_no_nan():
    cfg, ps, actor, critic = _trainers()
    responses = [[3, 4, 0], [6, 0], [8, 9, 10, 0]]

    def all_wrong(step: int) -> dict:
        return from_sequences(PROMPTS, responses, [0.0, 0.0, 0.0])

    history = value_pretrain(critic, all_wrong, dataclasses.replace(cfg.rl, value_pretrain_steps=3, value_pretrain_patience=5))
    assert len(history) == 3
    for h in history:
        assert h["explained_variance"] is None and math.isfinite(h["value_loss"])


def test_zero_variance_groups_leave_training_but_keep_their_rows():
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5]  # groups of 2: same, varied, same, same
    prompts = [[1, 2]] * 8
    batch = from_sequences(prompts, [[3, 4, 5]] * 8, rewards)
    out, kept, total = drop_zero_variance_groups(batch, 2)
    assert (kept, total) == (1, 4)
    assert out["trained_B"].tolist() == [False, False, True, True, False, False, False, False]
    assert out["input_ids_BS"].shape == batch["input_ids_BS"].shape and "trained_B" not in batch  # input untouched
    # a row whose score failed (untrained) does not make its group varied: the rest is constant
    batch["trained_B"] = torch.tensor([True, True, True, False, True, True, True, True])
    out, kept, _ = drop_zero_variance_groups(batch, 2)
    assert kept == 0 and not out["trained_B"].any()
    with pytest.raises(ValueError, match="samples_per_prompt=3"):
        drop_zero_variance_groups(batch, 3)


@pytest.mark.timeout(120)
def test_lambda_policy_is_logged_and_follows_length_alpha():
    responses = [[3] * 4, [4] * 8, [5] * 2, [6] * 4, [7] * 8, [8] * 2]
    batch = from_sequences([[1, 2]] * 6, responses, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    logged = {}
    for alpha in (0.05, 1.0):
        cfg, ps, actor, critic = _trainers(dataclasses.replace(RLConfig(), length_alpha=alpha))
        logged[alpha] = PPOTrainer(actor, critic, cfg.rl).step(dict(batch))["rollout/lambda_policy"]
    lengths = torch.tensor([4, 8, 2, 4, 8, 2], dtype=torch.float64)
    for alpha, value in logged.items():
        assert value == pytest.approx((1 - 1 / (alpha * lengths)).clamp(min=0).mean().item())
