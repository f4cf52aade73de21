"""The PPO phase of the memory-free dry run (:mod:`megatron_seed.plan.dry_run`), which lives below ``rl/``.

:func:`ppo_phase` runs one :meth:`rl.ppo.PPOTrainer.step` of rank ``R`` on meta tensors: the
actor and critic an RL job builds (``rl_trainer_config``, the critic initialised from the
actor, a reference policy when ``rl.kl_coef > 0``), fed a rollout batch in training layout
as it reaches the trainer from the host: this dp rank's share (:func:`rl.experience.dp_shard`)
of ``rl.prompts_per_step x rollout.samples_per_prompt`` rows of ``train.seq_len`` tokens, each
a prompt of ``train.seq_len - rollout.max_new_tokens`` tokens then a full-length response,
rewards alternating 1 and 0.
The step runs behaviour log-probs and values, GAE with whitening over dp, and
``rl.ppo_epochs x rl.mini_batches`` actor and critic updates.
"""
from __future__ import annotations

import torch

from megatron_seed.model.build import build_model_chunks, param_dtype
from megatron_seed.plan.dry_run import DryRunState, host_values
from megatron_seed.train.trainer import Trainer
from rl.experience import dp_shard
from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config


def rollout_batch(rows: int, seq_len: int, response_len: int) -> dict:
    """A rollout batch in training layout (:mod:`rl.experience`) on the host: every row a prompt then a
    ``response_len``-token response; even rows rewarded 1 (correct), odd rows 0."""
    S = seq_len
    response_BS = torch.zeros(rows, S, dtype=torch.bool)
    response_BS[:, S - min(response_len, S - 1):] = True
    rewards_B = (torch.arange(rows) % 2 == 0).float()
    return {
        "input_ids_BS": torch.zeros(rows, S, dtype=torch.long),
        "labels_BS": torch.zeros(rows, S, dtype=torch.long),
        "position_ids_BS": torch.arange(S).expand(rows, S).contiguous(),
        "padding_mask_BS": torch.ones(rows, S, dtype=torch.bool),
        "mask_BS": response_BS,
        "rewards_B": rewards_B,
        "correct_B": rewards_B > 0,
        "truncated_B": torch.zeros(rows, dtype=torch.bool),
    }


def ppo_phase(state: DryRunState) -> None:
    """One PPO step of the actor and critic (see the module docstring); the LM trainer of the earlier
    phases is dropped first (an RL job holds the actor and critic instead)."""
    cfg, ps = state.cfg, state.ps
    r = cfg.rl
    rows = r.prompts_per_step * cfg.rollout.samples_per_prompt
    with host_values():
        batch = dp_shard(rollout_batch(rows, cfg.train.seq_len, cfg.rollout.max_new_tokens), ps.dp_rank, ps.dp_size, r.mini_batches)
    state.trainers = []
    actor = Trainer(rl_trainer_config(cfg, "actor", rows // r.mini_batches, ps.dp_size), ps)
    critic = Trainer(rl_trainer_config(cfg, "critic", rows // r.mini_batches, ps.dp_size), ps)
    state.trainers = [actor, critic]
    init_critic_from_actor(critic, actor)
    if r.kl_coef > 0:
        state.frozen = build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed, param_dtype(cfg.train.precision, ps.device))
    PPOTrainer(actor, critic, r, reference=state.frozen or None, temperature=cfg.rollout.temperature).step(batch)


PHASES = {"ppo": ppo_phase}
