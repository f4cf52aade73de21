"""Value pretraining: on rollouts of a fixed policy (the rollout engine) whose reward depends on the
response, the critic's held-out value loss falls and its explained variance becomes positive."""
import dataclasses

import pytest
import torch

from megatron_seed.config import ConfigError, RLConfig, RolloutConfig
from megatron_seed.model.build import build_model_chunks
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer
from rl.experience import from_rollout
from rl.ppo import rl_trainer_config
from rl.rollout.engine import RolloutEngine
from rl.value_pretrain import PlateauStopper, value_pretrain
from tests.model_utils import tiny_config, tiny_model


def test_plateau_stopper():
    s = PlateauStopper(patience=2, min_delta=0.1)
    assert not s.update(1.0, 0.0)
    assert not s.update(0.5, 0.0)  # loss improved
    assert not s.update(0.45, 0.05)  # neither improved by more than 0.1: stale 1
    assert not s.update(0.45, 0.3)  # explained variance improved
    assert not s.update(0.44, 0.3)
    assert s.update(0.44, 0.35)  # second stale step
    with pytest.raises(ConfigError, match="patience"):
        PlateauStopper(patience=0, min_delta=0.0)


@pytest.mark.timeout(240)
def test_value_loss_falls_and_explained_variance_turns_positive():
    torch.manual_seed(0)
    cfg = tiny_config(tiny_model(), micro_batch_size=16)
    cfg.rl = dataclasses.replace(RLConfig(), critic_lr=1e-2, value_pretrain_steps=30, value_pretrain_patience=30)
    ps = ParallelState.single()
    policy = build_model_chunks(cfg.model, cfg.parallel, ps, seed=7)
    engine = RolloutEngine(policy, ps, RolloutConfig(max_new_tokens=5, samples_per_prompt=4), stop_ids=[0], pad_id=0, seed=3)
    critic = Trainer(rl_trainer_config(cfg, "critic", 16), ps)
    gen = torch.Generator().manual_seed(1)

    def sampler(step: int) -> dict:
        prompts = [[1 + i % 2] + torch.randint(3, 64, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist() for i in range(4)]
        rollout = engine.generate(prompts)
        # the reward depends on the prompt's first token and on the response's first token (known to the critic once seen)
        rewards = [0.7 * (p[0] == 1) + 0.3 * (r[0] % 2 == 0) for p, r in zip(rollout.prompts(), rollout.responses())]
        return from_rollout(rollout, rewards, [r > 0 for r in rewards])

    history = value_pretrain(critic, sampler, cfg.rl)
    assert len(history) == 30
    first = sum(h["value_loss"] for h in history[:10]) / 10
    last = sum(h["value_loss"] for h in history[-10:]) / 10
    assert last < 0.5 * first
    assert sum(h["explained_variance"] for h in history[-10:]) / 10 > 0.5
