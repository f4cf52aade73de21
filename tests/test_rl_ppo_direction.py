"""The PPO actor update is the policy gradient: on its first optimizer step (ratio exactly 1, no clip
binds) the gradient the trainer applies equals a hand-written REINFORCE gradient
``-sum_t A_t grad log pi_T(a_t | s_t) / N_tok`` on the same batch, at the sampling temperature T.

This pins down in one number the composition that decides whether PPO learns: the sign of the
advantage, the alignment of labels / log-probs / advantages / mask (the logits at s predict
``labels_BS[:, s]``), the tempered log-prob recompute and the trainer's normaliser.
"""
import dataclasses

import pytest
import torch

from megatron_seed.config import MoEConfig, RLConfig
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import vocab_parallel_log_probs
from megatron_seed.train.trainer import Trainer
from rl.experience import from_sequences
from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config
from tests.model_utils import tiny_config, tiny_model
from tests.numerics import rel_err

ROWS = 8


def build(temperature: float) -> PPOTrainer:
    # no aux loss: the actor's gradient is then the policy gradient alone
    cfg = tiny_config(tiny_model(moe=dataclasses.replace(tiny_model().moe, aux_loss_coef=0.0)), micro_batch_size=4)
    cfg.rl = dataclasses.replace(RLConfig(), ppo_epochs=1, mini_batches=1, lm_loss_coef=0.0, kl_coef=0.0, entropy_coef=0.0)
    ps = ParallelState.single()
    actor, critic = Trainer(rl_trainer_config(cfg, "actor", ROWS), ps), Trainer(rl_trainer_config(cfg, "critic", ROWS), ps)
    init_critic_from_actor(critic, actor)
    return PPOTrainer(actor, critic, cfg.rl, recompute_logprobs=True, temperature=temperature)


def rollouts() -> dict:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 64, (3,), generator=g).tolist() for _ in range(ROWS)]
    responses = [torch.randint(1, 64, (2 + b % 4,), generator=g).tolist() for b in range(ROWS)]
    return from_sequences(prompts, responses, [float(b % 3 == 0) for b in range(ROWS)])


def reinforce_grad(ppo: PPOTrainer, batch: dict, temperature: float, sign: float = 1.0) -> torch.Tensor:
    model = ppo.actor.chunks[0]
    model.train()
    model.zero_grad()
    logits_BSV = model(batch["input_ids_BS"], position_ids_BS=batch["position_ids_BS"], padding_mask_BS=batch["padding_mask_BS"])
    logprobs_BS = vocab_parallel_log_probs(logits_BSV.float() / temperature, batch["labels_BS"], ppo.ps)
    mask_BS = batch["mask_BS"]
    (-sign * (batch["advantages_BS"] * logprobs_BS)[mask_BS].sum() / mask_BS.sum()).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
    model.zero_grad()
    return grad


def applied_grad(ppo: PPOTrainer, batch: dict, monkeypatch) -> torch.Tensor:
    """The gradient the actor's optimizer step receives."""
    seen = {}
    step = ppo.actor.optimizer.step

    def recording_step(*args, **kwargs):
        seen["grad"] = torch.cat([p.grad.flatten() for p in ppo.actor.chunks[0].parameters() if p.grad is not None]).clone()
        return step(*args, **kwargs)

    monkeypatch.setattr(ppo.actor.optimizer, "step", recording_step)
    ppo.actor_update(batch)
    return seen["grad"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_actor_step_applies_the_reinforce_gradient(temperature, monkeypatch):
    ppo = build(temperature)
    batch, _ = ppo.prepare(rollouts())
    assert bool((batch["advantages_BS"][batch["mask_BS"]] > 0).any() and (batch["advantages_BS"][batch["mask_BS"]] < 0).any())
    expected = reinforce_grad(ppo, batch, temperature)
    assert rel_err(applied_grad(ppo, batch, monkeypatch), expected) <= 1e-5


def test_a_flipped_advantage_is_told_apart(monkeypatch):
    """The comparison can fail: the gradient of the opposite sign (a policy walking away from reward) is far off."""
    ppo = build(1.0)
    batch, _ = ppo.prepare(rollouts())
    assert rel_err(applied_grad(ppo, batch, monkeypatch), reinforce_grad(ppo, batch, 1.0, sign=-1.0)) > 1.0
