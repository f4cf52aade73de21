"""It learns, CI-sized: through RLTrainer.fit (the native rollout engine, the reward router interface, the real
PPO step and domain sampler) a tiny policy's reward on a toy task rises within a few PPO steps.

The vocabulary is a 54-character alphabet (tests.rl_trainer_utils.SmallAlphabetTokenizer) so that the
rewarded characters (digits) are sampled often enough from an untrained policy; the reward is their share
of the response. With the actor's learning rate at ~0 (rl.actor_lr=1e-12) the same run stays flat and
the assertion fails: it measures learning, not sampling noise.
"""
import json

import pytest

from megatron_seed.parallel.state import ParallelState
from rl.rl_trainer import RLTrainer
from tests.rl_trainer_utils import DigitShareRouter, SmallAlphabetTokenizer, math_records, tiny_rl_config

STEPS = 8


def reward_curve(save_dir, *overrides: str) -> list:
    cfg = tiny_rl_config(save_dir, "model.vocab_size=54", f"rl.steps={STEPS}", "rollout.max_new_tokens=8", "rollout.samples_per_prompt=4",
                         "rl.lm_loss_coef=0.0", "rl.adaptation_rule=uniform", "rl.length_alpha=1.0", "rl.eval_prompts=0", *overrides)
    RLTrainer(cfg, ParallelState.single(), SmallAlphabetTokenizer(), math_records(), DigitShareRouter()).fit()
    records = map(json.loads, open(save_dir / "metrics.jsonl"))
    return [r["ppo/rollout/reward_mean"] for r in records if "ppo/rollout/reward_mean" in r]


@pytest.mark.timeout(300)
def test_reward_rises_through_the_rl_trainer(tmp_path, one_thread):
    # 2 PPO epochs x 2 mini-batches per rollout (tests.rl_trainer_utils.TINY_RL), so the clip can bind
    rewards = reward_curve(tmp_path, "rl.actor_lr=1e-2")
    assert len(rewards) == STEPS
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
