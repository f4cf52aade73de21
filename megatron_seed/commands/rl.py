"""``megatron-seed rl``: a short end-to-end Seed1.5-Thinking RL run (one process or torchrun).

Policy: the config's model (the ``tiny`` preset by default), optionally from a
pretraining/SFT checkpoint (``--set train.load_dir=DIR``, weights only); the critic is
the same GPT-MoE with a value head, initialised from the policy's weights. Prompts: a
JSONL file (``--prompts`` or ``data.prompts``) or generated verifiable tasks
(arithmetic, linear equations, programs) from :mod:`data.tasks`. Rewards: the router
of :func:`rl.rewards.factory.build_reward_router` (config section ``rewards``; DAPO
overlong penalty from ``rl.overlong_penalty``); prompts it cannot score are refused
before training starts. Then value pretraining (``rl.value_pretrain_steps``) and
``rl.steps`` PPO steps, each: draw ``rl.prompts_per_step`` prompts with the adaptive
domain sampler, sample ``rollout.samples_per_prompt`` responses per prompt, score, PPO
update of actor and critic, update the domain weights from the step's rewards. Every
step logs reward, lengths, losses and domain weights to ``<save_dir>/metrics.jsonl``.
Actor, critic and sampler state are checkpointed under ``<save_dir>/actor`` and
``<save_dir>/critic``; ``--resume`` continues from them.

With ``rollout.engine=external`` responses come from a vLLM / SGLang server
(``rollout.external_url``): the policy's weights are written to
``rollout.external_weights_dir`` and reloaded by the server before the first rollout and
after every PPO step, and the behaviour log-probs are recomputed by the trainer.
"""
from __future__ import annotations

import argparse

from megatron_seed.cli import add_config_arguments

# The embedded default: minutes on 2 CPU cores. Applied before the user's --set, which win.
QUICK_RUN = [
    "rl.steps=4", "rl.value_pretrain_steps=3", "rl.prompts_per_step=4", "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=32", "train.micro_batch_size=8", "train.save_dir=runs/rl", "rl.actor_lr=1e-4", "rl.critic_lr=1e-3",
]
TASK_FAMILIES = ("arithmetic", "linear_equation", "program")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--prompts", default=None, help="RL prompt JSONL (default: data.prompts, else generated tasks)")
    parser.add_argument("--num-tasks", type=int, default=512, help="generated tasks when no prompt file is given")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in train.save_dir")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import load_config

    preset = args.preset or (None if args.config else "tiny")
    cfg = load_config(preset, args.config, QUICK_RUN + list(args.overrides))
    return rl_main(cfg, args.prompts or cfg.data.prompts, args.num_tasks, args.resume)


def _load_weights(chunks: list, load_dir: str, ps) -> None:
    from megatron_seed.train import checkpoint

    checkpoint.load_model_weights(chunks, ps, load_dir)


def _gather_domain_rewards(records: list, rewards: list, correct: list, n: int, ps) -> tuple:
    """``{domain: [G, n]}`` rewards and correct flags over every dp rank (the sampler needs the global step)."""
    import torch.distributed as dist

    groups = [(rec.domain, rewards[i * n:(i + 1) * n], correct[i * n:(i + 1) * n]) for i, rec in enumerate(records)]
    if ps.dp_size > 1:
        gathered: list = [None] * ps.dp_size
        dist.all_gather_object(gathered, groups, group=ps.group("dp"))
        groups = [g for part in gathered for g in part]
    by_reward: dict = {}
    by_correct: dict = {}
    for domain, r, c in groups:
        by_reward.setdefault(domain, []).append(r)
        by_correct.setdefault(domain, []).append(c)
    return by_reward, by_correct


def rl_main(cfg, prompts_path, num_tasks: int, resume: bool) -> int:
    """Build everything from ``cfg``, value-pretrain the critic, run the PPO steps, save. Returns an exit code."""
    import os

    import torch

    from data.prompts import load_prompts
    from data.tasks import SYSTEM_PROMPT, generate_prompts
    from data.tokenizer import load_tokenizer
    from megatron_seed.config import ConfigError
    from megatron_seed.model.build import build_model_chunks
    from megatron_seed.parallel.state import ParallelState, init_distributed
    from megatron_seed.train import checkpoint
    from megatron_seed.train.metrics import MetricsLogger
    from megatron_seed.train.trainer import Trainer
    from rl.adaptation import DomainSampler, split_by_domain
    from rl.experience import from_rollout, sample_and_score
    from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config
    from data.chat import ChatTemplate
    from megatron_seed.parallel.sharding import full_state_dict
    from rl.rollout.engine import RolloutEngine, local_prompts
    from rl.rollout.external import HTTPCompletionsEngine, OneQueryPerReplica
    from rl.rewards.factory import admit_prompts, build_reward_router
    from rl.value_pretrain import value_pretrain

    rank, world = init_distributed(cfg.parallel.backend)
    ps = ParallelState.build(cfg.parallel, world, rank)
    if not torch.cuda.is_available() and world == 1:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; fix: raise model.vocab_size")
    r = cfg.rl
    n = cfg.rollout.samples_per_prompt
    if r.prompts_per_step % ps.dp_size:
        raise ConfigError(f"rl.prompts_per_step={r.prompts_per_step} is not divisible by dp={ps.dp_size}; fix: make it a multiple of {ps.dp_size}")
    rows = r.prompts_per_step * n
    if rows % r.mini_batches:
        raise ConfigError(f"rl.prompts_per_step x rollout.samples_per_prompt = {rows} rows is not divisible by rl.mini_batches={r.mini_batches}")
    save_dir = cfg.train.save_dir
    actor_cfg, critic_cfg = rl_trainer_config(cfg, "actor", rows // r.mini_batches), rl_trainer_config(cfg, "critic", rows // r.mini_batches)
    actor_cfg.train.save_dir, critic_cfg.train.save_dir = os.path.join(save_dir, "actor"), os.path.join(save_dir, "critic")
    actor, critic = Trainer(actor_cfg, ps), Trainer(critic_cfg, ps)

    if prompts_path:
        records, report = load_prompts(prompts_path)
        if not records:
            raise ConfigError(f"{prompts_path}: no valid prompt records ({report.summary()})")
    else:
        records = generate_prompts(num_tasks, seed=cfg.train.seed, families=TASK_FAMILIES, difficulty=(1, 2))
    router = build_reward_router(cfg)
    admit_prompts(records, router)
    sampler = DomainSampler(split_by_domain(records), r, seed=cfg.train.seed)

    resumed = resume and checkpoint.latest_checkpoint(actor_cfg.train.save_dir) is not None
    if resumed:
        state = actor.load(actor_cfg.train.save_dir)
        critic.load(critic_cfg.train.save_dir)
        sampler.load_state_dict(state["sampler"])
        start = state["rl_step"]
    else:
        if cfg.train.load_dir:
            _load_weights(actor.chunks, cfg.train.load_dir, actor.ps)
            actor.optimizer.sync_master_from_params()
        init_critic_from_actor(critic, actor)
        start = 0
    reference = None
    if r.kl_coef > 0:  # the frozen starting policy
        reference = build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed)
        if cfg.train.load_dir:
            _load_weights(reference, cfg.train.load_dir, actor.ps)

    external = cfg.rollout.engine == "external"
    if external:
        # behaviour log-probs come from the server's kernels: recompute them with the trainer so PPO's ratio starts at 1
        engine = OneQueryPerReplica(HTTPCompletionsEngine.from_config(cfg.rollout, cfg.model, ChatTemplate(tokenizer).stop_ids, tokenizer.pad_id), ps)
        engine.sync_weights_from(full_state_dict(actor.chunks, ps))
    else:
        engine = RolloutEngine(actor.chunks, ps, cfg.rollout, tokenizer=tokenizer, seed=cfg.train.seed + start)
    ppo = PPOTrainer(actor, critic, r, reference=reference, recompute_logprobs=external, temperature=cfg.rollout.temperature)
    logger = MetricsLogger(os.path.join(save_dir, "metrics.jsonl"), enabled=actor.is_logging_rank)

    def rollout_batch() -> tuple:
        drawn = sampler.sample(r.prompts_per_step)  # identical on every rank; each dp rank takes its share
        mine = [p.record for p in local_prompts(drawn, ps)]
        rollout, results = sample_and_score(engine, mine, router, tokenizer, n, SYSTEM_PROMPT)
        rewards, correct = [x.reward for x in results], [x.correct for x in results]
        return mine, from_rollout(rollout, rewards, correct), rewards, correct

    try:
        if not resumed and r.value_pretrain_steps > 0:
            value_pretrain(critic, lambda step: rollout_batch()[1], r,
                           log=lambda step, m: logger.log(step, {f"value_pretrain/{k}": v for k, v in m.items() if k != "step"}))
        for step in range(start, r.steps):
            mine, batch, rewards, correct = rollout_batch()
            metrics = ppo.step(batch)
            if external:  # the server generates the next step with the updated policy
                engine.sync_weights_from(full_state_dict(actor.chunks, ps))
            by_reward, by_correct = _gather_domain_rewards(mine, rewards, correct, n, ps)
            metrics.update(sampler.update(by_reward, by_correct))
            logger.log(step + 1, metrics)
            if cfg.train.save_interval and (step + 1) % cfg.train.save_interval == 0:
                _save(actor, critic, sampler, step + 1)
        path = _save(actor, critic, sampler, r.steps)
    finally:
        logger.close()
    if actor.is_logging_rank:
        print(f"saved {path}")
    return 0


def _save(actor, critic, sampler, rl_step: int) -> str:
    critic.save()
    return actor.save({"sampler": sampler.state_dict(), "rl_step": rl_step})
