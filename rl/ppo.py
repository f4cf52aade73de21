"""The PPO step of the Seed1.5-Thinking recipe on the parallel trainer.

One :meth:`PPOTrainer.step` on a rollout batch in training layout (:mod:`rl.experience`),
this rank's share of the global batch (:func:`rl.experience.dp_shard`):

1. forward-only passes fill what the rollout did not bring: behaviour log-probs
   ``old_logprobs_BS`` (from the actor, when absent or ``recompute_logprobs``; the engine's
   own then stay as ``rollout_logprobs_BS``, which ``rl.tis_cap`` corrects for),
   ``old_values_BS`` (critic) and ``ref_logprobs_BS`` (reference policy, for the KL term);
   the actor's first forward of the batch (which gives the recomputed log-probs; with the rollout's
   log-probs kept, a forward-only pass for the measurement) is compared with the rollout's
   log-probs and recorded routes (:mod:`rl.mismatch`, the ``mismatch/*`` metrics);
2. routing replay (R3, ``rl.routing_replay=rollout``): every actor forward routes the tokens by
   the experts the rollout recorded for them (``routes_BSLA``, carried through padding, packing,
   micro-batches, pp stages, the tp / cp splits like any per-token key; :mod:`moe.router` says
   how the weights and balancing losses follow); the critic and the reference policy route by
   their own routers;
3. the terminal reward of each row goes on its last response token and
   :func:`rl.advantage.compute_advantages` gives decoupled, length-adaptive GAE
   advantages (whitened over the global batch) and value targets;
4. ``rl.ppo_epochs`` passes over ``rl.mini_batches`` mini-batches, each one optimizer
   step of the actor (:func:`rl.losses.actor_loss`: clip-higher PPO + mu * positive-example
   NLL + optional KL / entropy terms) and one of the critic (clipped value loss).

Both models run on the same :class:`~megatron_seed.parallel.state.ParallelState`, each in
its own :class:`~megatron_seed.train.trainer.Trainer` (optimizer, learning rate), and every
pass goes through the trainer's one step API: :meth:`Trainer.forward` for the
forward-only passes, :meth:`Trainer.train_step` with :func:`actor_loss_spec` /
:func:`critic_loss_spec` for the updates (the trainer counts the normaliser's units,
:func:`rl.losses.normalizer_units`, over the step's micro-batches and ``dp_cp``, so
micro-batched, data-parallel gradients equal those of one process on the whole
mini-batch). Log-probs and entropies are computed vocab-parallel from the local logit shard.

Under pipeline parallelism advantages live on the last stage; the other stages only
carry activations. The update metrics are shared with every stage by the trainer.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from megatron_seed.config import Config, ConfigError, RLConfig
from megatron_seed.parallel import context_parallel
from megatron_seed.parallel.mappings import reduce_scalars
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import vocab_parallel_entropy, vocab_parallel_log_probs
from megatron_seed.train.trainer import LossSpec, Trainer
from rl.advantage import compute_advantages, place_terminal_reward, values_after_response
from rl.experience import append_bootstrap_column, check_experience, check_routes, pad_columns, split_mini_batches
from rl.losses import LossNormalizer, actor_loss, explained_variance, normalizer_units, value_loss, value_metrics
from rl.mismatch import logprob_mismatch, route_mismatch
from rl.packing import PackedLayout, forward_rows, pack, plan_step
from rl.rollout.sampling import tempered


def rl_trainer_config(cfg: Config, role: str, rows_per_update: int, dp_size: int = 1) -> Config:
    """The trainer config of the ``actor`` or the ``critic`` for one RL run.

    A constant learning rate (``rl.actor_lr`` / ``rl.critic_lr``, after ``rl.warmup_steps``
    optimizer steps of linear warm-up; no decay: the RL step count is not the pretraining
    one), ``train.global_batch_size`` =
    ``rows_per_update`` (the rows of one optimizer step, over all ``dp_size`` ranks),
    micro-batches of at most one rank's share of them, and for the critic the same
    GPT-MoE with ``model.value_head=true``.
    """
    if role not in ("actor", "critic"):
        raise ValueError(f"role={role!r}: must be 'actor' or 'critic'")
    out = copy.deepcopy(cfg)
    lr = cfg.rl.actor_lr if role == "actor" else cfg.rl.critic_lr
    if lr <= 0:
        raise ConfigError(f"rl.{role}_lr={lr}: must be > 0")
    out.train.lr = out.train.min_lr = lr
    out.train.warmup_steps = cfg.rl.warmup_steps
    out.train.global_batch_size = rows_per_update
    out.train.micro_batch_size = max(1, min(cfg.train.micro_batch_size, rows_per_update // dp_size))
    out.model.value_head = role == "critic"
    return out


@torch.no_grad()
def init_critic_from_actor(critic: Trainer, actor: Trainer) -> None:
    """Copy every actor weight the critic has (all but the LM head), then sync the critic's optimizer.

    The critic starts from the policy's representation (Seed initialises it from the
    SFT / reward model); its value head keeps its own initialisation. Both trainers
    must share the parallel layout.
    """
    for a, c in zip(actor.chunks, critic.chunks):
        source = a.state_dict()
        for name, tensor in c.state_dict().items():
            if name in source and not name.startswith("value_head."):
                if source[name].shape != tensor.shape:
                    raise ValueError(f"critic weight {name} has shape {tuple(tensor.shape)} but the actor's is "
                                     f"{tuple(source[name].shape)}; build both from the same model and parallel config")
                tensor.copy_(source[name])
    critic.optimizer.sync_master_from_params()


ROUTE_KEYS = ("routes_BSLA", "compare_routes_BS")


def without_routes(batch):
    """``batch`` (a dict, or a list of packed micro-batch dicts) without the rollout's recorded routes: for the
    critic and the reference policy, which route by their own routers."""
    if isinstance(batch, list):
        return [without_routes(mb) for mb in batch]
    return {k: v for k, v in batch.items() if k not in ROUTE_KEYS}


def trained_mask(batch: dict) -> torch.Tensor:
    """``mask_BS`` without the rows whose optional ``trained_B`` is False (their score failed and says
    nothing about the answer): those rows reach no loss, normaliser or whitening statistic."""
    if "trained_B" not in batch:
        return batch["mask_BS"]
    return batch["mask_BS"] & batch["trained_B"].bool().to(batch["mask_BS"].device)[:, None]


def critic_values(critic: Trainer, batch: dict, layout: Optional[PackedLayout] = None) -> Optional[torch.Tensor]:
    """The critic's ``V`` at every position ``[B, S]`` (last stage; None elsewhere), through the packed
    micro-batches of ``layout`` when given."""
    return forward_rows(critic, batch, lambda values, mb: values.float(), layout)


def positive_tokens(batch: dict) -> torch.Tensor:
    """``positive_BS``: True on every position of the rows the reward marks correct (``correct_B``), the
    per-token form the losses read, which packing keeps when rows share a micro-batch."""
    return batch["correct_B"].bool().to(batch["mask_BS"].device)[:, None].expand_as(batch["mask_BS"])


def actor_loss_fn(ps: ParallelState, cfg: RLConfig, norm: LossNormalizer, temperature: float = 1.0) -> Callable:
    """The loss of one actor micro-batch: :func:`rl.losses.actor_loss` on vocab-parallel log-probs of the
    policy at the sampling ``temperature`` (the one the behaviour log-probs were taken at)."""

    def loss_fn(logits_BSV: torch.Tensor, mb: dict) -> tuple:
        logits_BSV = tempered(logits_BSV, temperature)
        logprobs_BS = vocab_parallel_log_probs(logits_BSV, mb["labels_BS"], ps)
        # the entropy is a metric unless it is in the objective: no graph for it then
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.entropy_coef > 0):
            entropy_BS = vocab_parallel_entropy(logits_BSV, ps)
        return actor_loss(logprobs_BS, mb["old_logprobs_BS"], mb["advantages_BS"], mb["mask_BS"], norm, cfg,
                          positive_BS=mb["positive_BS"], ref_logprobs_BS=mb.get("ref_logprobs_BS"), entropy_BS=entropy_BS,
                          rollout_logprobs_BS=mb.get("rollout_logprobs_BS"))

    return loss_fn


def critic_loss_fn(norm: LossNormalizer, clip: Optional[float], agg: str) -> Callable:
    """The loss of one critic micro-batch: :func:`rl.losses.value_loss` to ``returns_BS``."""

    def loss_fn(values_BS: torch.Tensor, mb: dict) -> tuple:
        return value_loss(values_BS, mb["old_values_BS"], mb["returns_BS"], mb["mask_BS"], norm, clip, agg)

    return loss_fn


def actor_loss_spec(cfg: RLConfig, temperature: float = 1.0) -> LossSpec:
    """The actor's step: normalised by the response tokens / sequences (and those of the positive rows);
    log-probs at the sampling ``temperature``."""
    return LossSpec(units=lambda mb: normalizer_units(mb["mask_BS"], mb["positive_BS"], mb.get("doc_ids_BS")),
                    build=lambda totals, ps: actor_loss_fn(ps, cfg, LossNormalizer.from_totals(totals), temperature))


def critic_loss_spec(clip: Optional[float], agg: str) -> LossSpec:
    """The critic's step (``clip=None``: the plain value loss of value pretraining); reports explained variance."""
    return LossSpec(units=lambda mb: normalizer_units(mb["mask_BS"], doc_ids_BS=mb.get("doc_ids_BS")),
                    build=lambda totals, ps: critic_loss_fn(LossNormalizer.from_totals(totals), clip, agg),
                    finalize=value_metrics)


def _mean_metrics(updates: list, prefix: str) -> dict:
    keys = sorted({k for u in updates for k in u})
    return {f"{prefix}/{k}": sum(u[k] for u in updates if k in u) / sum(k in u for u in updates) for k in keys}


class PPOTrainer:
    """Actor and critic updates for one rollout batch at a time (see the module docstring).

    ``reference``: model chunks of the frozen reference policy (needed when
    ``rl.kl_coef > 0``). ``recompute_logprobs``: take the behaviour log-probs from the
    actor's own forward (same kernels as training, so the first ratio is exactly 1)
    instead of those the rollout engine reported (needed when the engine is another program or
    samples at another precision; its log-probs are kept as ``rollout_logprobs_BS`` for truncated
    importance sampling, ``rl.tis_cap``). ``bootstrap_truncated``: GAE bootstraps
    rows cut off by ``max_new_tokens`` from the critic's value of the whole cut response
    (one position past the last token, a column appended for it); off by default because
    outcome rewards (verifier, overlong penalty) score the cut response as final, so
    the episode ended there and a bootstrap would count the future twice. ``temperature``: the
    rollout's sampling temperature; every policy log-prob (recomputed behaviour, reference, the
    actor's new ones) is taken at it, so the ratio compares the distributions that were sampled.

    With ``train.max_tokens_per_micro_batch`` (the actor's config) every pass runs on packed,
    dp-token-balanced micro-batches (:mod:`rl.packing`): :meth:`prepare` moves rows between the
    dp ranks and keeps the step's :class:`~rl.packing.PackedLayout` in ``self.layout``.
    """

    def __init__(self, actor: Trainer, critic: Trainer, cfg: RLConfig, reference: Optional[list] = None,
                 recompute_logprobs: bool = False, bootstrap_truncated: bool = False, temperature: float = 1.0):
        if actor.ps is not critic.ps:
            raise ValueError("actor and critic must share one ParallelState (colocated on the same groups)")
        if not critic.cfg.model.value_head:
            raise ConfigError("the critic needs model.value_head=true; build its config with rl_trainer_config(cfg, 'critic', ...)")
        if actor.cfg.model.value_head:
            raise ConfigError("the actor must be a language model (model.value_head=false)")
        if cfg.kl_coef > 0 and reference is None:
            raise ConfigError(f"rl.kl_coef={cfg.kl_coef} needs a reference policy; pass reference=<model chunks> or set rl.kl_coef=0")
        if cfg.ppo_epochs < 1 or cfg.mini_batches < 1:
            raise ConfigError(f"rl.ppo_epochs={cfg.ppo_epochs} and rl.mini_batches={cfg.mini_batches} must be >= 1")
        self.actor, self.critic, self.cfg, self.reference = actor, critic, cfg, reference
        self.ps = actor.ps
        self.recompute_logprobs = recompute_logprobs
        self.bootstrap_truncated = bootstrap_truncated
        self.temperature = temperature
        self.max_tokens = actor.cfg.train.max_tokens_per_micro_batch
        self.layout: Optional[PackedLayout] = None  # packed micro-batches of the batch last prepared (None: padded rows)
        self.updates: list = []  # per optimizer step: {"actor": metrics, "critic": metrics} of the last step() call
        self.routing_replay = cfg.routing_replay == "rollout"
        for chunk in actor.chunks:  # every actor forward routes the tokens the rollout recorded by its routes
            chunk.set_routing_replay(self.routing_replay)

    # ------------------------------------------------------------------ forward-only passes
    def policy_logprobs(self, batch: dict, chunks: Optional[list] = None, layout: Optional[PackedLayout] = None) -> Optional[torch.Tensor]:
        """``log pi(labels_BS)`` ``[B, S]`` of the actor (or of other policy ``chunks`` on its groups, e.g.
        the reference), micro-batched like the actor's training steps (packed under ``layout``; last stage,
        None elsewhere)."""
        return forward_rows(self.actor, batch, lambda logits, mb: vocab_parallel_log_probs(tempered(logits, self.temperature),
                                                                                           mb["labels_BS"], self.ps), layout, chunks)

    def critic_values(self, batch: dict, layout: Optional[PackedLayout] = None) -> Optional[torch.Tensor]:
        return critic_values(self.critic, batch, layout)

    def prepare(self, batch: dict, measure_mismatch: bool = True) -> tuple:
        """Fill old log-probs / values / reference log-probs, then advantages and returns; ``(batch, metrics)``.

        ``measure_mismatch``: add the ``mismatch/*`` metrics (:mod:`rl.mismatch`). They compare the rollout with
        training's first forward of the batch, which recomputed behaviour log-probs need anyway; when the rollout's
        own log-probs are kept, that forward runs for the metrics alone (``rl.mismatch_interval`` spaces it out)."""
        check_experience(batch)
        check_routes(batch, self.actor.cfg.model)
        if self.routing_replay and "routes_BSLA" not in batch:
            raise ConfigError("rl.routing_replay=rollout: the rollout batch has no recorded routes (routes_BSLA); the in-process engine "
                              "records them for an MoE policy, an external engine does not; fix: rl.routing_replay=off")
        if self.bootstrap_truncated:  # the critic's value after the last token needs one more position
            batch = append_bootstrap_column(batch)
        batch = pad_columns(batch, context_parallel.sequence_multiple(self.ps))
        batch = {k: v.to(self.ps.device) if torch.is_tensor(v) else v for k, v in batch.items()}  # meets the model's outputs
        self.layout = None
        if self.max_tokens is not None:  # this rank's rows change: the dp ranks' token counts balance
            batch, self.layout = plan_step(batch, self.ps, self.cfg.mini_batches, self.max_tokens)
        batch["positive_BS"] = positive_tokens(batch)
        filled, metrics = {}, {}
        rollout_logprobs, routes = "old_logprobs_BS" in batch, "routes_BSLA" in batch
        # training's first forward of the batch, at the rollout's weights: the behaviour log-probs when they are
        # recomputed, and what the rollout's log-probs and routes are measured against (rl.mismatch)
        recompute, compare = self.recompute_logprobs or not rollout_logprobs, routes and measure_mismatch
        if recompute or measure_mismatch:
            for chunk in self.actor.chunks:
                for layer in chunk.moe_layers():
                    layer.reset_route_counts()
            first_logprobs = self.policy_logprobs(dict(batch, compare_routes_BS=batch["mask_BS"]) if compare else batch, layout=self.layout)
        if compare:
            metrics.update(route_mismatch(self.actor.chunks, self.ps))
        if measure_mismatch and rollout_logprobs and self.ps.is_last_stage:
            metrics.update(logprob_mismatch(first_logprobs, batch["old_logprobs_BS"], batch["mask_BS"], self.ps))
        if recompute:
            if rollout_logprobs:  # the engine's own, for truncated importance sampling (rl.tis_cap)
                batch["rollout_logprobs_BS"] = batch["old_logprobs_BS"]
            filled["old_logprobs_BS"] = first_logprobs
        if self.reference is not None:  # its own routes: the recorded ones are the policy's
            filled["ref_logprobs_BS"] = self.policy_logprobs(without_routes(batch), self.reference, self.layout)
        if "old_values_BS" not in batch or self.bootstrap_truncated:  # rollout values stop before the last token
            filled["old_values_BS"] = self.critic_values(without_routes(batch), self.layout)
        # None on all but the last pipeline stage; a None entry would break the micro-batch split
        batch.update({key: value for key, value in filled.items() if value is not None})
        response_BS = batch["mask_BS"]
        batch["mask_BS"] = trained_mask(batch)
        if self.ps.is_last_stage:
            mask_BS = batch["mask_BS"]
            rewards_BS = place_terminal_reward(batch["rewards_B"].to(torch.float32), response_BS)
            truncated_B, values_after_B = None, None
            if self.bootstrap_truncated:
                truncated_B, values_after_B = batch["truncated_B"], values_after_response(batch["old_values_BS"], mask_BS)
            adv = compute_advantages(rewards_BS, batch["old_values_BS"], mask_BS, self.cfg, truncated_B, self.ps.group("dp"),
                                     values_after_B)
            batch["advantages_BS"], batch["returns_BS"] = adv.advantages_BS.float(), adv.returns_BS.float()
            lam = reduce_scalars([adv.lambda_policy_B.sum(), len(adv.lambda_policy_B)], self.ps.group("dp"), device=self.ps.device)
            metrics["rollout/lambda_policy"] = lam[0] / max(lam[1], 1.0)  # mean over the global batch's rows
            metrics["critic/explained_variance_before"] = explained_variance(batch["old_values_BS"], batch["returns_BS"], mask_BS,
                                                                             self.ps.group("dp"))
        else:  # earlier pipeline stages never read them; keep the keys so micro-batches split alike
            zeros = torch.zeros(batch["mask_BS"].shape, device=self.ps.device)
            for key in ("old_logprobs_BS", "old_values_BS", "ref_logprobs_BS", "advantages_BS", "returns_BS"):
                if batch.get(key) is None and (key != "ref_logprobs_BS" or self.reference is not None):
                    batch[key] = zeros
        return batch, metrics

    # ------------------------------------------------------------------ updates
    def actor_update(self, batch) -> dict:
        return self.actor.train_step(batch if self.routing_replay else without_routes(batch), actor_loss_spec(self.cfg, self.temperature))

    def critic_update(self, batch, clip: Optional[float]) -> dict:
        return self.critic.train_step(without_routes(batch), critic_loss_spec(clip, self.cfg.loss_agg))

    def step(self, batch: dict, measure_mismatch: bool = True) -> dict:
        """One PPO step on this rank's rows of a rollout batch; returns metrics (floats); ``measure_mismatch``: see
        :meth:`prepare`.

        ``actor/*`` and ``critic/*`` are averaged over the ``ppo_epochs x mini_batches``
        optimizer steps (the first step's are in ``self.updates[0]``); rollout metrics
        (reward, response length, pass rate) are global-batch means.
        """
        rollout = rollout_metrics(batch, self.ps)  # before prepare() masks untrained rows: every response counts
        batch, metrics = self.prepare(batch, measure_mismatch)
        metrics.update(rollout)
        if self.layout is None:
            minis = split_mini_batches(batch, self.cfg.mini_batches)
        else:
            minis = [pack(batch, micro, self.layout.width) for micro in self.layout.mini_batches]
            metrics.update(self.layout.metrics())
        self.updates = []
        for _ in range(self.cfg.ppo_epochs):
            for mini in minis:
                self.updates.append({"actor": self.actor_update(mini), "critic": self.critic_update(mini, self.cfg.value_clip)})
        metrics.update(_mean_metrics([u["actor"] for u in self.updates], "actor"))
        metrics.update(_mean_metrics([u["critic"] for u in self.updates], "critic"))
        return metrics


def rollout_metrics(batch: dict, ps: ParallelState) -> dict:
    """Global-batch means of reward, pass rate, response length and the truncated fraction."""
    # the batch may still be on the host (prepare() moves it); the sums are computed on the rank's device
    mask_BS, rewards_B, correct_B, truncated_B = (batch[k].to(ps.device) for k in ("mask_BS", "rewards_B", "correct_B", "truncated_B"))
    lengths = mask_BS.sum(dim=1).double()
    n, reward, correct, length, truncated = reduce_scalars(
        [lengths.numel(), rewards_B.sum(), correct_B.sum(), lengths.sum(), truncated_B.sum()],
        ps.group("dp"), device=ps.device)
    n = max(n, 1.0)
    return {"rollout/reward_mean": reward / n, "rollout/pass_rate": correct / n, "rollout/response_length": length / n,
            "rollout/truncated_frac": truncated / n}
