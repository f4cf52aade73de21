"""Supervised fine-tuning on chat conversations through the trainer's LM step.

The ``sft`` config section says what to train on and how long: ``sft.data`` (a
``{"messages": [...]}`` JSONL file, :func:`data.sft.iter_conversations`) or, when it is
None, ``sft.examples`` generated worked solutions of the ``data.task_families`` tasks
(:func:`data.tasks.generate_sft`, seed ``train.seed + 2``: RL prompts use ``train.seed``, the held-out set ``+ 1``); ``sft.steps`` optimizer steps at ``sft.lr`` (linear
warm-up over ``sft.warmup_steps``, cosine decay to ``sft.lr / 10``) on
``train.global_batch_size`` rows of ``train.seq_len`` tokens a step. Conversations are
packed several to a row (:func:`data.sft.build_sft_batches`); attention and positions
restart at every document, and only assistant replies (and their end-of-turn token)
are trained on: the loss is the NLL of those tokens, averaged over the global batch's
trained tokens (``Trainer.train_step`` with the LM loss).

Used by ``megatron-seed sft`` and by the RL run's SFT warm-up phase, which trains the
actor's own weights in place (:class:`SFT` takes the model chunks to train).
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterator, Optional, Sequence

import torch

from data.chat import ChatTemplate
from data.sft import IGNORE_INDEX, build_sft_batches, iter_conversations, tokenize_conversations
from megatron_seed.config import Config, ConfigError
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer


def sft_trainer_config(cfg: Config) -> Config:
    """The trainer config of the SFT phase: ``train.*`` with the ``sft`` section's steps and learning rate."""
    out = copy.deepcopy(cfg)
    s = cfg.sft
    out.train.steps, out.train.lr, out.train.min_lr = s.steps, s.lr, s.lr / 10
    out.train.warmup_steps = min(s.warmup_steps, s.steps)
    out.model.value_head = False
    return out


def trainer_batch(batch: dict) -> dict:
    """:mod:`data.sft`'s ``[B, S]`` batch in the trainer's micro-batch keys (``loss_mask_BS`` = trained label)."""
    labels_BS = batch["labels"]
    trained_BS = labels_BS != IGNORE_INDEX
    return {
        "input_ids_BS": batch["input_ids"],
        "labels_BS": torch.where(trained_BS, labels_BS, 0),
        "loss_mask_BS": trained_BS.float(),
        "position_ids_BS": batch["position_ids"],
        "doc_ids_BS": batch["doc_ids"],
    }


def sft_conversations(cfg: Config, exclude_prompts: Sequence[str] = ()) -> list:
    """The conversations of ``cfg.sft`` (see the module docstring), without those whose user turn is in ``exclude_prompts``."""
    s = cfg.sft
    if s.data:
        conversations = list(iter_conversations(s.data))
        if not conversations:
            raise ConfigError(f"sft.data={s.data}: no valid conversations (each line needs a non-empty 'messages' list)")
    else:
        from data.tasks import generate_sft, system_prompt

        conversations = generate_sft(s.examples, seed=cfg.train.seed + 2, families=cfg.data.task_families,
                                     difficulty=tuple(cfg.data.task_difficulty), system=system_prompt(cfg.data.system_prompt),
                                     worked=cfg.data.worked_solutions)
    held_out = set(exclude_prompts)
    kept = [c for c in conversations if not any(m["role"] == "user" and m["content"] in held_out for m in c)]
    if not kept:
        raise ConfigError("sft: every conversation's prompt is a held-out evaluation prompt; nothing left to train on")
    return kept


class SFT:
    """The SFT loop of one rank on ``chunks`` (the actor's, in the RL run; a fresh model otherwise).

    Built once: the trainer (own optimizer and LR schedule), the tokenized, packed,
    dp-sharded batches (``train.global_batch_size / dp`` rows a step, cycled).
    ``run()`` trains until ``sft.steps`` and returns the last step's metrics; the
    trainer's ``step`` is the position, so a loaded checkpoint continues where it was.
    """

    def __init__(self, cfg: Config, ps: ParallelState, tokenizer, conversations: Sequence, chunks: Optional[list] = None):
        if cfg.sft.steps < 1:
            raise ConfigError(f"sft.steps={cfg.sft.steps}: SFT needs at least one step")
        self.cfg = sft_trainer_config(cfg)
        self.ps = ps
        self.trainer = Trainer(self.cfg, ps, chunks=chunks)
        t = self.cfg.train
        examples = tokenize_conversations(conversations, ChatTemplate(tokenizer), t.seq_len)
        rows = build_sft_batches(examples, t.seq_len, self.trainer.local_batch_size, seed=t.seed, pack=True,
                                 dp_rank=ps.dp_rank, dp_size=ps.dp_size)
        full = [b for b in rows if b["input_ids"].shape[0] == self.trainer.local_batch_size]
        if not full:
            raise ConfigError(f"sft: {len(examples)} conversations pack into fewer than one global batch of "
                              f"{t.global_batch_size} rows of {t.seq_len} tokens; fix: add data (sft.examples) or lower train.global_batch_size")
        self.batches = [trainer_batch(b) for b in full]

    def batch_iterator(self) -> Iterator[dict]:
        """The batches in order, cycled, from the trainer's current step (the data position)."""
        start = self.trainer.step % len(self.batches)
        return itertools.islice(itertools.cycle(self.batches), start, None)

    def run(self, logger=None, progress: bool = False) -> dict:
        return self.trainer.fit(self.batch_iterator(), logger, progress=progress)
