"""The RL run's SFT warm-up phase: the actor learns the tasks' worked solutions before value pretraining and PPO.

``sft.steps`` optimizer steps of :class:`megatron_seed.train.sft.SFT` on the actor's own
model chunks (its own optimizer and schedule, the same parallel groups), on worked
solutions whose prompts are not held-out evaluation prompts. When it ends, the actor's
optimizer takes the new weights as its master copy and the critic is initialised
from the SFT policy (Seed initialises the critic from the policy it will judge), so
value pretraining fits the returns of the policy PPO starts from.

A phase object of :class:`rl.rl_trainer.RLTrainer` (``name``, ``step``, ``total``,
``done``, ``run(rl)``, ``state_dict`` / ``load_state_dict``): resumable mid-way, its
optimizer state and step ride in the run state; the weights are the actor's.
"""
from __future__ import annotations

import time
from typing import Sequence

from megatron_seed.config import Config
from megatron_seed.train.sft import SFT, sft_conversations
from rl.ppo import init_critic_from_actor


class SFTPhase:
    name = "sft"

    def __init__(self, cfg: Config, actor, tokenizer, held_out_prompts: Sequence[str] = ()) -> None:
        self.total = cfg.sft.steps
        self.done = self.total == 0
        self.sft = None if self.done else SFT(cfg, actor.ps, tokenizer, sft_conversations(cfg, held_out_prompts), chunks=actor.chunks)
        self._batches = None

    @property
    def step(self) -> int:
        return self.sft.trainer.step if self.sft is not None else 0

    def run(self, rl) -> None:
        if self._batches is None:
            self._batches = self.sft.batch_iterator()
        while not self.done and not rl.stop_requested():
            t0 = time.perf_counter()
            metrics = self.sft.trainer.train_step(next(self._batches))
            metrics["seconds"] = time.perf_counter() - t0
            self.done = self.step >= self.total
            if self.done:
                rl.actor.optimizer.sync_master_from_params()
                init_critic_from_actor(rl.critic, rl.actor)
            rl.log(self, metrics)
            rl.maybe_save(self)

    def state_dict(self) -> dict:
        if self.sft is None:
            return {"step": 0, "done": True}
        return {"step": self.step, "done": self.done, "optimizer": self.sft.trainer.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]
        if self.sft is not None:
            self.sft.trainer.step = state["step"]
            self.sft.trainer.optimizer.load_state_dict(state["optimizer"])
            self._batches = None
