"""The RL run's SFT warm-up phase: the actor learns the tasks' worked solutions before value pretraining and PPO.

``sft.steps`` optimizer steps of :class:`megatron_seed.train.sft.SFT` on the actor's own
model chunks (its own optimizer and LR schedule, the same parallel groups), on the
conversations of the ``sft`` config section without any whose prompt is a held-out
evaluation prompt. When the last step is done:

* the actor's optimizer takes the SFT weights as its master copy (its next step, PPO's
  first, starts from them rather than from the weights the run was built with);
* the critic is initialised from the SFT policy (Seed initialises the critic from the
  policy it will judge), so value pretraining fits the returns of the policy PPO starts from.

With ``sft.stop_accuracy`` the phase ends earlier: every ``sft.eval_interval`` steps its
``validator`` (:class:`rl.evaluate.HeldOutEvaluator` on the first ``sft.eval_prompts`` RL
prompts, which SFT then leaves out too; never the held-out evaluation's) scores the greedy policy, and the first score
at or above the target is the last step (logged as ``sft/val_greedy_acc``). PPO learns
from groups whose rewards differ, so it needs a partly right start; when a tiny model
crosses from wrong to right during SFT depends on its seed by hundreds of steps.

A phase of :class:`rl.rl_trainer.RLTrainer` (``name``, ``step``, ``total``, ``done``,
``run(rl)``, ``state_dict`` / ``load_state_dict``). The weights are the actor's (in the
actor's checkpoint); the phase state holds the SFT step, which is also the data position
and the LR-schedule position, and, until the phase is done, the SFT optimizer's state, so
a run stopped mid-SFT continues exactly.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

from megatron_seed.config import Config
from megatron_seed.train.sft import SFT, sft_conversations
from megatron_seed.train.trainer import Trainer
from rl.evaluate import HeldOutEvaluator
from rl.ppo import init_critic_from_actor


class SFTPhase:
    """SFT of ``actor``'s chunks (see the module docstring); ``held_out``: the held-out evaluation's records, which SFT
    must not train on; ``rl_records``: the RL prompts, the first of which validate ``sft.stop_accuracy``; ``system``:
    their system turn."""

    name = "sft"

    def __init__(self, cfg: Config, actor: Trainer, tokenizer, held_out: Sequence = (), rl_records: Sequence = (),
                 system: Optional[str] = None) -> None:
        self.total = cfg.sft.steps
        self.done = self.total == 0
        self.stop_accuracy, self.eval_interval = cfg.sft.stop_accuracy, cfg.sft.eval_interval
        excluded = [rec.prompt for rec in held_out]
        self.validator = None
        if self.stop_accuracy is not None and not self.done:
            validation = list(rl_records[: cfg.sft.eval_prompts])
            self.validator = HeldOutEvaluator(validation, actor.chunks, actor.ps, cfg.rollout, tokenizer, cfg.train.seed + 3, 0, system)
            excluded += [rec.prompt for rec in validation]
        self.sft = None if self.done else SFT(cfg, actor.ps, tokenizer, sft_conversations(cfg, excluded), chunks=actor.chunks)

    @property
    def step(self) -> int:
        return self.sft.trainer.step if self.sft is not None else 0

    def run(self, rl) -> None:
        batches = self.sft.batch_iterator()  # from the current step: the data position of a resumed run
        while not self.done and not rl.stop_requested():
            t0 = time.perf_counter()
            metrics = self.sft.trainer.train_step(next(batches))
            metrics["seconds"] = time.perf_counter() - t0
            self.done = self.step >= self.total
            if self.stop_accuracy is not None and self.step % self.eval_interval == 0:
                metrics["val_greedy_acc"] = self.validator.evaluate().overall_greedy_acc
                self.done = self.done or metrics["val_greedy_acc"] >= self.stop_accuracy
            if self.done:
                rl.actor.optimizer.sync_master_from_params()
                init_critic_from_actor(rl.critic, rl.actor)
            rl.log(self, metrics)
            rl.maybe_save(self)

    def state_dict(self) -> dict:
        state = {"step": self.step, "done": self.done}
        if self.sft is not None and not self.done:  # a finished phase needs its optimizer no more
            state["optimizer"] = self.sft.trainer.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]
        if self.sft is not None:
            self.sft.trainer.step = state["step"]
            if "optimizer" in state:
                self.sft.trainer.optimizer.load_state_dict(state["optimizer"])
