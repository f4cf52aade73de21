"""PPO step: tp=2, dp=2 and pp=2 equal one process; the first ratio is exactly 1; the update moves the policy the right way."""
import dataclasses

import numpy as np
import pytest
import torch

from megatron_seed.config import ConfigError, ParallelConfig, RLConfig
from megatron_seed.model.build import build_model_chunks
from megatron_seed.parallel.sharding import gather_full
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer
from rl.experience import dp_shard, from_sequences
from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config
from tests.model_utils import tiny_config, tiny_model
from tests.numerics import assert_close_rel

ROWS = 8


def synthetic_rollouts(seed: int = 0) -> dict:
    """8 rows with prompts of 2-4 tokens and responses of 1-7 tokens (uneven), 0/1 rewards, some truncated."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 64, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist() for _ in range(ROWS)]
    lengths = [1, 7, 3, 5, 2, 6, 4, 7]
    responses = [torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths]
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    truncated = [False, True, False, False, False, False, False, True]
    # left at its own width: under tp the PPO step pads columns to a multiple of tp, and padding changes nothing
    # (masked out of attention, the losses and the MoE balancing statistics), so every layout trains the same batch
    return from_sequences(prompts, responses, rewards, truncated=truncated)


def ppo_config(parallel: dict, **rl):
    cfg = tiny_config(tiny_model(), micro_batch_size=2, adam_eps=1e-4)
    cfg.parallel = dataclasses.replace(ParallelConfig(), **parallel)
    settings = dict(ppo_epochs=2, mini_batches=2, actor_lr=1e-2, critic_lr=1e-2, lm_loss_coef=0.1, kl_coef=0.05, entropy_coef=0.01)
    cfg.rl = dataclasses.replace(RLConfig(), **{**settings, **rl})
    return cfg


def build(cfg, ps: ParallelState) -> PPOTrainer:
    rows_per_update = ROWS // cfg.rl.mini_batches
    actor = Trainer(rl_trainer_config(cfg, "actor", rows_per_update), ps)
    critic = Trainer(rl_trainer_config(cfg, "critic", rows_per_update), ps)
    init_critic_from_actor(critic, actor)
    reference = build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed) if cfg.rl.kl_coef > 0 else None
    return PPOTrainer(actor, critic, cfg.rl, reference=reference)


def full_parameters(trainer: Trainer) -> dict:
    return {n: gather_full(p, trainer.ps).numpy().copy() for c in trainer.chunks for n, p in c.named_parameters()}


def ppo_run(rank: int, world: int, parallel: dict) -> dict:
    cfg = ppo_config(parallel)
    ps = ParallelState.build(cfg.parallel, world, rank)
    ppo = build(cfg, ps)
    metrics = ppo.step(dp_shard(synthetic_rollouts(), ps.dp_rank, ps.dp_size, cfg.rl.mini_batches))
    return {"actor": full_parameters(ppo.actor), "critic": full_parameters(ppo.critic), "metrics": metrics,
            "first": ppo.updates[0]["actor"]}


@pytest.fixture(scope="module")
def single():
    return ppo_run(0, 1, {})


def test_first_ratio_is_exactly_one(single):
    first = single["first"]
    assert first["approx_kl"] == 0.0 and first["clip_frac_high"] == 0.0 and first["clip_frac_low"] == 0.0
    assert first["ratio"] == pytest.approx(1.0, abs=1e-12)
    # the second epoch sees updated weights: the policy moved
    assert single["metrics"]["actor/approx_kl"] > 0
    for key in ("actor/pg_loss", "actor/lm_loss", "actor/entropy", "actor/kl_ref", "critic/value_loss",
                "critic/explained_variance", "critic/explained_variance_before", "rollout/reward_mean"):
        assert np.isfinite(single["metrics"][key]), key
    assert single["metrics"]["rollout/reward_mean"] == pytest.approx(0.5)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("parallel", [{"tp": 2}, {"dp": 2}, {"pp": 2}], ids=["tp2", "dp2", "pp2"])
def test_parallel_ppo_step_equals_single_process(single, parallel):
    out = run_distributed(ppo_run, 2, parallel)
    for model in ("actor", "critic"):
        held = [rank_out[model] for rank_out in out]  # under pp each rank holds its stage's parameters
        for name, ref in single[model].items():
            copies = [params[name] for params in held if name in params]
            assert copies, (model, name)
            for copy in copies:
                assert_close_rel(copy, ref, 1e-5, f"{model} {name}")
    # the logging rank holds the global metrics
    for key in ("actor/pg_loss", "actor/lm_loss", "critic/value_loss", "actor/clip_frac_high", "critic/explained_variance"):
        # abs: the summands are O(1), so fp32 rounding of their mean is ~1e-7 absolute, however far the mean cancels
        assert out[-1]["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-5), key


def test_update_raises_logprob_of_positive_advantage_rows():
    cfg = ppo_config({}, kl_coef=0.0, entropy_coef=0.0, lm_loss_coef=0.0, ppo_epochs=1, mini_batches=1)
    ppo = build(cfg, ParallelState.single())
    batch = synthetic_rollouts(seed=1)
    before = ppo.policy_logprobs(batch)
    prepared, _ = ppo.prepare(batch)
    ppo.step(batch)
    after = ppo.policy_logprobs(batch)
    mask, adv = prepared["mask_BS"], prepared["advantages_BS"]
    delta = (after - before)[mask]
    # the surrogate's first-order change: sum A * dlogp > 0 (a gradient step on -sum A * ratio)
    assert float((adv[mask] * delta).sum()) > 0


def test_kl_without_reference_is_a_config_error():
    cfg = ppo_config({}, kl_coef=0.1)
    ps = ParallelState.single()
    actor = Trainer(rl_trainer_config(cfg, "actor", 4), ps)
    critic = Trainer(rl_trainer_config(cfg, "critic", 4), ps)
    with pytest.raises(ConfigError, match="reference"):
        PPOTrainer(actor, critic, cfg.rl)
    with pytest.raises(ConfigError, match="value_head"):
        PPOTrainer(actor, actor, dataclasses.replace(cfg.rl, kl_coef=0.0))
