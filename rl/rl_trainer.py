"""The Seed1.5-Thinking RL run as one object: build from a Config, phases, step, evaluate, checkpoint, fit.

Phases run in order on one :class:`~megatron_seed.parallel.state.ParallelState` and one
set of weights (colocated: the rollout engine generates with the actor's chunks). Each
is optional (its step count 0) and resumable mid-way; a phase is an object with a ``name``,
``step``, ``total``, ``done``, ``run(rl)`` (steps until it is done or a stop is requested)
and ``state_dict`` / ``load_state_dict``:

* ``sft`` (``sft.steps > 0``): the actor learns worked solutions (:mod:`rl.sft_phase`); at
  its end the actor's optimizer takes the SFT weights and the critic starts from them;
* ``value_pretrain`` (``rl.value_pretrain_steps > 0``): the critic fits the Monte-Carlo
  returns of the frozen starting policy (:mod:`rl.value_pretrain`), stopping on a plateau;
* ``ppo`` (``rl.steps``): :meth:`RLTrainer.step` per step, a held-out evaluation
  before the first step, every ``rl.eval_interval`` steps and at the end.

One PPO step: draw ``rl.prompts_per_step`` prompts with the adaptive domain sampler
(the same draw on every rank), take this dp rank's share (round robin,
:func:`rl.rollout.engine.local_prompts`), sample ``rollout.samples_per_prompt`` responses
each, score them with the reward router; with ``rl.filter_zero_variance`` (DAPO dynamic
sampling) the groups whose rewards are all equal leave the update
(:func:`rl.experience.drop_zero_variance_groups`, counted over dp: ``rollout/groups_kept`` /
``groups_dropped``) and a step with none left makes no update; run
:meth:`rl.ppo.PPOTrainer.step` (actor and critic through the trainer's one step API), then
fold the step's rewards (all of them, gathered over dp) into the domain weights.

Checkpoints (every ``train.save_interval`` steps of a phase, at the end of each phase,
and on Ctrl-C) hold actor and critic (weights, optimizers, step counters, torch RNG)
under ``<train.save_dir>/actor`` and ``/critic``, and with the actor :meth:`state_dict`:
the phase position, the sampler (weights, signals, data position, RNG), the rollout
engine's generator and the evaluations so far. ``resume`` continues exactly: the next
steps equal those of an uninterrupted run.

What a user sees (logging rank): a progress bar per phase; one line per step;
``metrics.jsonl`` and TensorBoard (``<save_dir>/tensorboard``) with every metric under
its phase's prefix and step counter (``ppo/actor/pg_loss`` at PPO step 3); a few sampled
responses with their rewards every ``rl.log_samples_interval`` steps; at the end PNG plots
(``<save_dir>/rl_curves.png``) and a table of held-out accuracy before and after PPO per domain.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_seed.config import Config, ConfigError
from megatron_seed.model.build import build_model_chunks
from megatron_seed.parallel.mappings import reduce_scalars
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train import checkpoint
from megatron_seed.train.metrics import MetricsLogger
from megatron_seed.train.trainer import Trainer, progress_bar
from rl.adaptation import DomainSampler, split_by_domain
from rl.evaluate import HeldOutEvaluator, exclude_prompts
from rl.experience import drop_zero_variance_groups, from_rollout, render_prompts, score_rollout
from rl.rewards.base import loss_mask, reason_counts
from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config, rollout_metrics
from rl.rollout.engine import RolloutEngine, local_prompts
from rl.sft_phase import SFTPhase
from rl.value_pretrain import PlateauStopper, value_pretrain_step

class ValuePretrainPhase:
    """Fit the critic to Monte-Carlo returns of the starting policy (``rl.value_pretrain_*``)."""

    name = "value_pretrain"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.step = 0
        self.done = cfg.value_pretrain_steps == 0
        self.stopper = PlateauStopper(cfg.value_pretrain_patience, cfg.value_pretrain_min_delta)

    @property
    def total(self) -> int:
        return self.cfg.value_pretrain_steps

    def run(self, rl: "RLTrainer") -> None:
        while not self.done and not rl.stop_requested():
            t0 = time.perf_counter()
            batch, _, _ = rl.rollout()
            metrics = value_pretrain_step(rl.critic, batch, self.cfg)
            self.step += 1
            metrics["seconds"] = time.perf_counter() - t0
            self.done = self.step >= self.total or self.stopper.update(metrics["value_loss"], metrics["explained_variance"])
            rl.log(self, metrics)
            rl.maybe_save(self)

    def state_dict(self) -> dict:
        return {"step": self.step, "done": self.done, "stopper": dataclasses.asdict(self.stopper)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.done = state["step"], state["done"]
        self.stopper = PlateauStopper(**state["stopper"])


class PPOPhase:
    """``rl.steps`` PPO steps with held-out evaluations before, every ``rl.eval_interval`` steps and at the end."""

    name = "ppo"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.step = 0
        self.done = cfg.steps == 0

    @property
    def total(self) -> int:
        return self.cfg.steps

    def run(self, rl: "RLTrainer") -> None:
        if self.step == 0 and not self.done:
            rl.start_ppo()
            rl.evaluate("before_ppo", self)
        while not self.done and not rl.stop_requested():
            metrics = rl.step(show_samples=bool(self.cfg.log_samples_interval) and (self.step + 1) % self.cfg.log_samples_interval == 0,
                              measure_mismatch=bool(self.cfg.mismatch_interval) and self.step % self.cfg.mismatch_interval == 0)
            self.step += 1
            self.done = self.step >= self.total
            rl.log(self, metrics)
            if self.done:
                rl.evaluate("after_ppo", self)
            elif self.cfg.eval_interval and self.step % self.cfg.eval_interval == 0:
                rl.evaluate(f"ppo_step_{self.step}", self)
            rl.maybe_save(self)

    def state_dict(self) -> dict:
        return {"step": self.step, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.done = state["step"], state["done"]


class RLTrainer:
    """The whole RL run of one rank (see the module docstring).

    ``records``: training prompts (:class:`data.prompts.PromptRecord`); ``router``: the
    reward router; ``held_out``: prompts of the held-out evaluation
    (:class:`rl.evaluate.HeldOutEvaluator` on the actor's weights, scored against their
    ground truth; None or empty: no evaluation); ``engine``: the rollout engine (default:
    the in-process :class:`~rl.rollout.engine.RolloutEngine` on the actor's chunks);
    ``system``: system prompt of every rollout. Phases: ``sft`` -> ``value_pretrain`` -> ``ppo``.
    """

    def __init__(self, cfg: Config, ps: ParallelState, tokenizer, records: Sequence, router, held_out: Optional[Sequence] = None,
                 engine=None, system: Optional[str] = None, progress: Optional[bool] = None):
        r, n = cfg.rl, cfg.rollout.samples_per_prompt
        if r.prompts_per_step % ps.dp_size:
            raise ConfigError(f"rl.prompts_per_step={r.prompts_per_step} is not divisible by dp={ps.dp_size}; "
                              f"fix: make it a multiple of {ps.dp_size}")
        local_rows = r.prompts_per_step // ps.dp_size * n
        if local_rows % r.mini_batches:
            raise ConfigError(f"{local_rows} rollout rows per dp rank are not divisible by rl.mini_batches={r.mini_batches}; "
                              f"fix: make rl.prompts_per_step / dp x rollout.samples_per_prompt a multiple of it")
        if not records:
            raise ConfigError("RL: no training prompts")
        self.cfg, self.ps, self.tokenizer, self.router, self.system = cfg, ps, tokenizer, router, system
        self.save_dir = cfg.train.save_dir
        rows_per_update = r.prompts_per_step * n // r.mini_batches
        actor_cfg, critic_cfg = rl_trainer_config(cfg, "actor", rows_per_update, ps.dp_size), rl_trainer_config(cfg, "critic", rows_per_update,
                                                                                                    ps.dp_size)
        actor_cfg.train.save_dir, critic_cfg.train.save_dir = os.path.join(self.save_dir, "actor"), os.path.join(self.save_dir, "critic")
        self.actor, self.critic = Trainer(actor_cfg, ps), Trainer(critic_cfg, ps)
        if cfg.train.load_dir:  # a pretrained / SFT policy (weights only, saved under any layout)
            checkpoint.load_model_weights(self.actor.chunks, ps, cfg.train.load_dir)
            self.actor.optimizer.sync_master_from_params()
        init_critic_from_actor(self.critic, self.actor)
        # the frozen reference of the KL term: the policy PPO starts from
        self.reference = build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed) if r.kl_coef > 0 else None
        self.sampler = DomainSampler(split_by_domain(records), r, seed=cfg.train.seed)
        self.engine = engine if engine is not None else RolloutEngine(self.actor.chunks, ps, cfg.rollout, tokenizer=tokenizer,
                                                                      seed=cfg.train.seed)
        # behaviour log-probs from another program (external engine) or precision (rollout.dtype) are recomputed by the actor
        exact = isinstance(self.engine, RolloutEngine) and self.engine.samples_with_trained_weights
        self.ppo = PPOTrainer(self.actor, self.critic, r, reference=self.reference, recompute_logprobs=not exact,
                              temperature=cfg.rollout.temperature)
        self.evaluator = None
        if held_out:
            self.evaluator = HeldOutEvaluator(held_out, self.actor.chunks, ps, cfg.rollout, tokenizer, cfg.train.seed + 1,
                                              r.eval_samples, system)
        self.phases = [SFTPhase(cfg, self.actor, tokenizer, held_out or (), records, system), ValuePretrainPhase(r), PPOPhase(r)]
        self.evals: dict = {}  # name -> {domain or "all": {"greedy", "sampled", "pass@k"}} (EvalReport.table)
        self.logging = self.actor.is_logging_rank
        self.progress = cfg.train.progress if progress is None else progress
        self.logger = MetricsLogger(os.path.join(self.save_dir, "metrics.jsonl"), enabled=self.logging,
                                    tensorboard_dir=os.path.join(self.save_dir, "tensorboard"))
        self._bar = None
        self._stop = False
        if r.tis_cap is not None and exact:
            self._say(f"rl.tis_cap={r.tis_cap}: truncated importance sampling is inactive (weights all 1): the rollout samples "
                      f"with the trained weights at their precision (rollout.dtype={cfg.rollout.dtype}), so its log-probs are "
                      "the training forward's")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: Config, prompts_path: Optional[str] = None, **kwargs) -> "RLTrainer":
        """Everything from ``cfg``: groups (torchrun / SLURM or one process), tokenizer, prompts (a JSONL
        file, else ``data.num_tasks`` generated verifiable tasks), the reward router, the rollout engine and the evaluator."""
        from data.prompts import load_prompts
        from data.tasks import generate_prompts, system_prompt
        from megatron_seed.train.run_setup import load_run_tokenizer, start_run
        from rl.rewards.factory import admit_prompts, build_reward_router

        ps = start_run(cfg)
        tokenizer = load_run_tokenizer(cfg)
        prompts_path = prompts_path or cfg.data.prompts
        families, difficulty = cfg.data.task_families, tuple(cfg.data.task_difficulty)
        if prompts_path:
            records, report = load_prompts(prompts_path)
            if not records:
                raise ConfigError(f"{prompts_path}: no valid prompt records ({report.summary()})")
        else:
            num_tasks = cfg.data.num_tasks or max(1, cfg.rl.steps * cfg.rl.prompts_per_step)
            records = generate_prompts(num_tasks, seed=cfg.train.seed, families=families, difficulty=difficulty)
        if cfg.rl.eval_prompts:  # generated held-out tasks (another seed) that never appear in training
            held_out = generate_prompts(cfg.rl.eval_prompts, seed=cfg.train.seed + 1, families=families, difficulty=difficulty)
            records = exclude_prompts(records, held_out)
            kwargs.setdefault("held_out", held_out)
        if cfg.rollout.engine == "external" and "engine" not in kwargs:
            from data.chat import ChatTemplate
            from rl.rollout.external import HTTPCompletionsEngine, OneQueryPerReplica

            kwargs["engine"] = OneQueryPerReplica(HTTPCompletionsEngine.from_config(
                cfg.rollout, cfg.model, ChatTemplate(tokenizer).stop_ids, tokenizer.pad_id), ps)
        router = build_reward_router(cfg)
        admit_prompts(records, router)  # prompts the router cannot score are refused before any training
        return cls(cfg, ps, tokenizer, records, router, system=system_prompt(cfg.data.system_prompt), **kwargs)

    def start_ppo(self) -> None:
        """Freeze the reference policy of the KL term: the policy PPO starts from (after any SFT)."""
        if self.reference is not None:
            with torch.no_grad():
                for ref, actor in zip(self.reference, self.actor.chunks):
                    ref.load_state_dict(actor.state_dict())

    # ------------------------------------------------------------------ one step
    def rollout(self, show_samples: bool = False) -> tuple:
        """Sample and score this rank's share of one step's prompts: ``(batch, metrics, domain_results)``."""
        r = self.cfg.rl
        drawn = self.sampler.sample(r.prompts_per_step)  # identical on every rank; each dp rank takes its share
        mine = [p.record for p in local_prompts(drawn, self.ps)]
        t0 = time.perf_counter()
        rollout = self.engine.generate(render_prompts(mine, self.tokenizer, self.system), n=self.cfg.rollout.samples_per_prompt)
        t1 = time.perf_counter()
        results = score_rollout(rollout, mine, self.router, self.tokenizer, [int(i) for i in self.engine.stop_ids])
        t2 = time.perf_counter()
        rewards, correct = [x.reward for x in results], [x.correct for x in results]
        batch = from_rollout(rollout, rewards, correct)
        # a score that says nothing about the answer (the scorer failed) stays out of every loss and normaliser
        batch["trained_B"] = torch.tensor(loss_mask(results), dtype=torch.bool)
        counts = reason_counts(results)
        tokens, *counts_total = reduce_scalars([rollout.response_lengths_B.sum()] + list(counts.values()), self.ps.group("dp"),
                                               device=self.ps.device)
        metrics = {"time/generate_s": t1 - t0, "time/score_s": t2 - t1, "rollout/tokens": tokens,
                   **{f"reward/{k}": v for k, v in zip(counts, counts_total)}}
        if show_samples and self.logging:
            self._show_samples(mine, rollout, results)
        return batch, metrics, (mine, rewards, correct)

    def step(self, show_samples: bool = False, measure_mismatch: bool = True) -> dict:
        """One PPO step (see the module docstring); the step's metrics, the same on every rank (with the
        ``mismatch/*`` ones when ``measure_mismatch``)."""
        t0 = time.perf_counter()
        batch, metrics, (mine, rewards, correct) = self.rollout(show_samples)
        t1 = time.perf_counter()
        kept = None
        if self.cfg.rl.filter_zero_variance:
            batch, kept, total = drop_zero_variance_groups(batch, self.cfg.rollout.samples_per_prompt, self.ps.group("dp"), self.ps.device)
            metrics["rollout/groups_kept"], metrics["rollout/groups_dropped"] = kept, total - kept
        # rows left to learn from, over dp: the filter's kept groups, less the rows whose scoring failed (masked)
        trained = kept if kept == 0 else reduce_scalars([batch["trained_B"].sum()], self.ps.group("dp"), device=self.ps.device)[0]
        if trained == 0:  # the weights, optimizers and their step counters stay as they are
            metrics.update(rollout_metrics(batch, self.ps))
            why = (f"every one of the {total} groups has equal rewards (rl.filter_zero_variance)" if kept == 0
                   else "every sample's scoring failed (masked; see the ppo/reward/* counts)")
            self._say(f"{why}: no update this step")
        else:
            metrics.update(self.ppo.step(batch, measure_mismatch))
            self._sync_external_engine()  # the server generates the next step with the updated policy
        metrics["time/train_s"] = time.perf_counter() - t1
        by_reward, by_correct = self._gather_by_domain(mine, rewards, correct)
        metrics.update(self.sampler.update(by_reward, by_correct))
        for d, flags in by_correct.items():
            metrics[f"rollout/accuracy/{d}"] = sum(sum(g) for g in flags) / sum(len(g) for g in flags)
        seconds = time.perf_counter() - t0
        metrics["time/step_s"] = seconds
        metrics["rollout/tokens_per_s"] = metrics["rollout/tokens"] / seconds
        return metrics

    def _sync_external_engine(self) -> None:
        """Write the policy's weights for an external server (vLLM / SGLang) and have it reload them."""
        if hasattr(self.engine, "sync_weights_from"):
            from megatron_seed.parallel.sharding import full_state_dict

            self.engine.sync_weights_from(full_state_dict(self.actor.chunks, self.ps))

    def _gather_by_domain(self, records: list, rewards: list, correct: list) -> tuple:
        """``{domain: [G, n]}`` rewards and correct flags over every dp rank (the sampler needs the global step)."""
        n = self.cfg.rollout.samples_per_prompt
        groups = [(rec.domain, rewards[i * n:(i + 1) * n], correct[i * n:(i + 1) * n]) for i, rec in enumerate(records)]
        if self.ps.dp_size > 1:
            gathered: list = [None] * self.ps.dp_size
            dist.all_gather_object(gathered, groups, group=self.ps.group("dp"))
            groups = [g for part in gathered for g in part]
        by_reward: dict = {}
        by_correct: dict = {}
        for domain, rs, cs in groups:
            by_reward.setdefault(domain, []).append(rs)
            by_correct.setdefault(domain, []).append(cs)
        return by_reward, by_correct

    def evaluate(self, name: str, phase=None) -> Optional[dict]:
        """Held-out evaluation of the current policy, recorded as ``name``; its metrics (None without an evaluator)."""
        if self.evaluator is None:
            return None
        report = self.evaluator.evaluate()
        self.evals[name] = report.table()
        metrics = report.metrics("eval")
        if phase is not None:
            self.log(phase, metrics, line=False)
        return metrics

    # ------------------------------------------------------------------ what a user sees
    def log(self, phase, metrics: dict, line: bool = True) -> None:
        """``metrics`` under the phase's prefix and step counter: JSONL, TensorBoard and (``line``) one console line."""
        if not self.logging:
            return
        write = self._bar.write if self._bar is not None else print
        self.logger.log(phase.step, {"phase": phase.name, **{f"{phase.name}/{k}": v for k, v in metrics.items()}}, echo=False)
        if line:
            if self._bar is not None:
                self._bar.update(1)
            write(step_line(phase.name, phase.step, phase.total, metrics))
        else:
            write(f"{phase.name} {phase.step}: " + "  ".join(f"{k} {_num(v)}" for k, v in metrics.items()))

    def _say(self, text: str) -> None:
        """A console line from the logging rank (through the progress bar when there is one)."""
        if self.logging:
            (self._bar.write if self._bar is not None else print)(text)

    def _show_samples(self, records: list, rollout, results: list) -> None:
        from rl.experience import response_texts

        texts = response_texts(rollout, self.tokenizer, [int(i) for i in self.engine.stop_ids])
        write = self._bar.write if self._bar is not None else print
        for b in range(min(self.cfg.rl.log_samples, len(texts))):
            record = records[int(rollout.prompt_index_B[b])]
            res = results[b]
            write(f"  sample [{record.domain}] {_short(record.prompt, 100)!r}\n"
                  f"    -> {_short(texts[b], 160)!r}\n    reward {res.reward:.3f} ({res.reason})")

    def summary_table(self) -> str:
        """Held-out accuracy before PPO (after any SFT) and after PPO, per domain: greedy (and its gain in
        points), then each sampled measure (sampled accuracy, pass@k) before -> after."""
        before, after = self.evals.get("before_ppo"), self.evals.get("after_ppo")
        if not before or not after:
            return "no held-out evaluation before and after PPO (rl.eval_prompts=0 or PPO not finished)"
        start = "after SFT" if self.cfg.sft.steps else "before PPO"
        sampled = [k for k in before["all"] if k != "greedy"]
        rows = [f"{'domain':<16}{start:>11}{'after PPO':>11}{'gain':>8}" + "".join(f"{k:>16}" for k in sampled)]
        for d in sorted(k for k in before if k != "all") + ["all"]:
            b, a = before[d], after[d]
            cells = "".join(f"{100 * b[k]:>8.1f} ->{100 * a[k]:>5.1f}" for k in sampled)
            rows.append(f"{d:<16}{100 * b['greedy']:>10.1f}%{100 * a['greedy']:>10.1f}%{100 * (a['greedy'] - b['greedy']):>+8.1f}{cells}")
        return "\n".join(rows)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything of the run that is not in the actor / critic trainers' own checkpoints."""
        state = {"phases": {p.name: p.state_dict() for p in self.phases}, "sampler": self.sampler.state_dict(), "evals": self.evals}
        if isinstance(self.engine, RolloutEngine):
            state["engine_rng"] = self.engine.generator.get_state()
        if self.reference is not None:
            state["reference"] = [m.state_dict() for m in self.reference]
        return state

    def load_state_dict(self, state: dict) -> None:
        for p in self.phases:
            if p.name in state["phases"]:
                p.load_state_dict(state["phases"][p.name])
        self.sampler.load_state_dict(state["sampler"])
        self.evals = dict(state["evals"])
        if "engine_rng" in state and isinstance(self.engine, RolloutEngine):
            self.engine.generator.set_state(state["engine_rng"])
        if self.reference is not None:
            for m, s in zip(self.reference, state["reference"]):
                m.load_state_dict(s)

    def save(self) -> str:
        """Collective: critic, then actor with the run state (the actor's ``latest`` marks a complete checkpoint)."""
        self.critic.save({"actor_step": self.actor.step})
        path = self.actor.save({"rl": self.state_dict()})
        self._say(f"saved {path}")
        return path

    def maybe_save(self, phase) -> None:
        interval = self.cfg.train.save_interval
        if phase.done or self._stop or (interval and phase.step % interval == 0):
            self.save()

    def resume(self) -> bool:
        """Load the latest checkpoint under ``train.save_dir`` if there is one; True when resumed."""
        actor_dir = os.path.join(self.save_dir, "actor")
        if checkpoint.latest_checkpoint(actor_dir) is None:
            return False
        state = self.actor.load(actor_dir)
        self.critic.load(self._critic_checkpoint_of(self.actor.step))
        self.load_state_dict(state["rl"])
        return True

    def _critic_checkpoint_of(self, actor_step: int) -> str:
        """The critic checkpoint saved with the actor's ``actor_step``. :meth:`save` writes the critic first, so a run
        killed between the two saves left a critic ``latest`` one save ahead: its previous checkpoint is the match."""
        critic_dir = os.path.join(self.save_dir, "critic")
        latest = checkpoint.latest_checkpoint(critic_dir)
        saved = sorted((d for d in os.listdir(critic_dir) if d.startswith("iter_") and not d.endswith((".tmp", ".old"))), reverse=True)
        for path in ([latest] if latest else []) + [os.path.join(critic_dir, d) for d in saved]:
            if checkpoint.Checkpoint(path).extra(self.ps.rank).get("actor_step") == actor_step:
                return path
        raise checkpoint.CheckpointError(f"{critic_dir}: no checkpoint belongs to actor step {actor_step} (the actor's latest); "
                                         "fix: resume from a save_dir whose actor and critic were saved together")

    # ------------------------------------------------------------------ the run
    def stop_requested(self) -> bool:
        """True on every rank once any rank got Ctrl-C (all ranks must stop at the same step)."""
        (flag,) = reduce_scalars([float(self._stop)], self.ps.group("world"), dist.ReduceOp.MAX, device=self.ps.device)
        self._stop = flag > 0
        return self._stop

    def fit(self) -> dict:
        """Run every phase not done yet; Ctrl-C saves and returns. Returns ``{"evals", "stopped"}``."""
        previous = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        try:
            self._sync_external_engine()  # the server starts from the policy as built or resumed
            for phase in self.phases:
                if phase.done:
                    continue
                self._bar = progress_bar(phase.total, phase.step, self.progress and self.logging, phase.name)
                try:
                    phase.run(self)
                finally:
                    self._bar.close()
                    self._bar = None
                if self._stop:
                    if self.logging:
                        print(f"stopped by Ctrl-C in {phase.name} at step {phase.step}; resume with --resume", flush=True)
                    break
            else:
                if self.logging:
                    self.finish()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self.logger.close()
        return {"evals": self.evals, "stopped": self._stop}

    def _on_sigint(self, signum, frame) -> None:
        if self._stop:  # a second Ctrl-C: stop now, without the save
            raise KeyboardInterrupt
        self._stop = True

    def finish(self) -> None:
        """End of the run (logging rank): plots next to the checkpoints and the before / after table."""
        path = plot_metrics(os.path.join(self.save_dir, "metrics.jsonl"), os.path.join(self.save_dir, "rl_curves.png"))
        print(f"plots: {path}")
        print(self.summary_table(), flush=True)


# ----------------------------------------------------------------------------- console and plots

_LINE = (("loss", "loss"), ("reward", "rollout/reward_mean"), ("acc", "rollout/pass_rate"), ("len", "rollout/response_length"), ("dropped", "rollout/groups_dropped"),
         ("kl_ref", "actor/kl_ref"), ("kl_old", "actor/approx_kl"), ("clip_lo", "actor/clip_frac_low"),
         ("clip_hi", "actor/clip_frac_high"), ("vloss", "critic/value_loss"), ("ev", "critic/explained_variance"),
         ("H", "actor/entropy"), ("value_loss", "value_loss"), ("ev", "explained_variance"), ("val acc", "val_greedy_acc"))


def step_line(phase: str, step: int, total: int, metrics: dict) -> str:
    """One concise console line of a step's metrics."""
    parts = [f"{phase} {step}/{total}"]
    parts += [f"{label} {_num(metrics[key])}" for label, key in _LINE if key in metrics]
    weights = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("adapt/weight/")}
    if weights:
        parts.append("w " + ",".join(f"{d[:5]}={v:.2f}" for d, v in weights.items()))
    if "rollout/tokens_per_s" in metrics:
        parts.append(f"{metrics['rollout/tokens_per_s']:.0f} tok/s")
    times = [(label, metrics[key]) for label, key in (("gen", "time/generate_s"), ("score", "time/score_s"), ("train", "time/train_s"))
             if key in metrics]
    if times:
        parts.append(" ".join(f"{label} {v:.1f}s" for label, v in times))
    elif "seconds" in metrics:
        parts.append(f"{metrics['seconds']:.1f}s")
    return " | ".join(parts)


def _num(v) -> str:
    if not isinstance(v, (int, float)):
        return str(v)
    if not math.isfinite(v):
        return "nan"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def plot_metrics(jsonl_path: str, png_path: str) -> str:
    """Reward and held-out accuracy, response length, domain weights and explained variance over PPO
    steps (value pretraining's explained variance beside it), from ``metrics.jsonl``; one PNG."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict = {}
    with open(jsonl_path) as f:
        for line in f:
            record = json.loads(line)
            for k, v in record.items():
                if isinstance(v, float):
                    series.setdefault(k, {})[record["step"]] = v  # a resumed run rewrites a step: the last value wins

    def plot(ax, key: str, label: str) -> None:
        if key in series:
            steps = sorted(series[key])
            ax.plot(steps, [series[key][s] for s in steps], marker=".", label=label)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    plot(ax, "ppo/rollout/reward_mean", "reward")
    plot(ax, "ppo/rollout/pass_rate", "rollout accuracy")
    plot(ax, "ppo/eval/greedy_acc", "held-out accuracy (greedy)")
    ax.set_title("reward and accuracy")
    plot(axes[0][1], "ppo/rollout/response_length", "response length")
    axes[0][1].set_title("response length (tokens)")
    for k in sorted(series):
        if k.startswith("ppo/adapt/weight/"):
            plot(axes[1][0], k, k.rsplit("/", 1)[1])
    axes[1][0].set_title("domain weights")
    plot(axes[1][1], "ppo/critic/explained_variance", "PPO")
    plot(axes[1][1], "value_pretrain/explained_variance", "value pretraining")
    axes[1][1].set_title("explained variance")
    for ax in axes.flat:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
