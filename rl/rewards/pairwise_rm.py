"""Pairwise reward model: a GPT-MoE with a scalar head, trained on preference pairs.

Score of a (prompt, response) text: the value head's output at the last real token
(``model.value_head=True`` makes :class:`GPTModel` return ``values_BS``; sequences are
right-padded, so causal attention never sees the padding). Training minimises the
Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``; accuracy is the share of
pairs with ``r_chosen > r_rejected``.

Training goes through the one train step of :class:`megatron_seed.train.trainer.Trainer`
(:func:`train_reward_model` with :data:`PAIRWISE_LOSS`), so it runs under any dp / tp / ep
layout on the trainer's optimizer and learning-rate schedule (``train.*``): a batch
holds each pair as two consecutive rows (chosen, rejected), normalised by the pairs of
the global batch.

Scoring for non-verifiable prompts (:class:`PairwiseRMScorer`): a response is compared
with every other non-empty response of its group (``ScoringSample.group``; the router
fills it with the batch's responses to the same prompt), or with the reference response
when there is no group; its reward is the win rate ``mean_j sigmoid(r_i - r_j)`` (the
Bradley-Terry probability of winning each duel). An empty response scores 0 without a
forward. Scoring runs in one process (the model of a one-stage trainer, or one built here).
"""
from __future__ import annotations

import copy
import json
import math
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from megatron_seed.config import Config, ConfigError, ModelConfig, config_from_dict, validate_model
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import LossSpec, Trainer
from rl.rewards.base import BaseScorer, RewardResult, ScoringSample

RESPONSE_SEPARATOR = "\n"


class Encoder(Protocol):
    """What the reward model needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list: ...


class ByteEncoder:
    """UTF-8 bytes as ids 1..256 (0 is padding): a tokenizer for tests and tiny models."""

    vocab_size = 257
    pad_id = 0

    def encode(self, text: str) -> list:
        return [b + 1 for b in text.encode("utf-8")]


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def load_pairs(path: str) -> list[PreferencePair]:
    """JSONL with one ``{"prompt", "chosen", "rejected"}`` object per line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append(PreferencePair(str(row["prompt"]), str(row["chosen"]), str(row["rejected"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt', 'chosen' and 'rejected' "
                                 f"({type(e).__name__}: {e})") from None
    if not pairs:
        raise ValueError(f"{path}: no preference pairs found")
    return pairs


class RewardModel(torch.nn.Module):
    """GPT-MoE with a scalar head; ``forward`` gives one score per sequence."""

    def __init__(self, cfg: ModelConfig, encoder: Encoder, seed: int = 0,
                 ps: Optional[ParallelState] = None, gpt: Optional[GPTModel] = None) -> None:
        """``gpt``: score with this (already built, e.g. a trainer's) model instead of a fresh one."""
        super().__init__()
        if not cfg.value_head:
            raise ValueError("RewardModel: model.value_head must be true (the scalar head replaces the LM head)")
        if encoder.vocab_size > cfg.vocab_size:
            raise ValueError(f"RewardModel: tokenizer has {encoder.vocab_size} ids but model.vocab_size is "
                             f"{cfg.vocab_size}; set model.vocab_size >= {encoder.vocab_size}")
        self.cfg, self.encoder = cfg, encoder
        self.pad_id = getattr(encoder, "pad_id", 0)
        if gpt is None:
            gpt = GPTModel(cfg, ps or ParallelState.single())
            gpt.init_weights(seed)
        self.gpt = gpt

    def tokenize(self, prompts: Sequence[str], responses: Sequence[str], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``ids_BS`` (``S`` a multiple of ``multiple``) and the index of each sequence's
        last real token ``last_B``.

        Over-long sequences keep their end (the response matters most): the prompt is cut from the left.
        """
        seqs = []
        for p, r in zip(prompts, responses):
            ids = self.encoder.encode(p + RESPONSE_SEPARATOR + r) or [self.pad_id]
            seqs.append(ids[-self.cfg.max_seq_len:])
        S = max(len(s) for s in seqs)
        S += -S % multiple
        ids_BS = torch.full((len(seqs), S), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids_BS[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        last_B = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
        return ids_BS, last_B

    def forward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Scores ``r_B``: the value at each sequence's last real token."""
        ids_BS, last_B = self.tokenize(prompts, responses)
        device = next(self.parameters()).device
        values_BS = self.gpt(ids_BS.to(device))
        return values_BS.gather(1, last_B.to(device)[:, None]).squeeze(1)


def pair_batch(model: RewardModel, pairs: Sequence[PreferencePair], multiple: int = 1) -> dict:
    """Trainer batch of ``pairs``: rows ``2i`` (chosen) and ``2i + 1`` (rejected) of ``input_ids_BS``,
    with ``last_B`` the row's last real token (``S`` padded to a multiple of ``multiple``, e.g. tp)."""
    prompts = [p.prompt for p in pairs for _ in range(2)]
    responses = [r for p in pairs for r in (p.chosen, p.rejected)]
    ids_BS, last_B = model.tokenize(prompts, responses, multiple)
    return {"input_ids_BS": ids_BS, "last_B": last_B}


def _pair_margins(values_BS: torch.Tensor, mb: dict) -> torch.Tensor:
    """``r_chosen - r_rejected`` of each pair of a :func:`pair_batch` micro-batch ``[B / 2]``."""
    if values_BS.shape[0] % 2:
        raise ValueError(f"a reward-model micro-batch has {values_BS.shape[0]} rows; pairs need an even train.micro_batch_size")
    r_B = values_BS.float().gather(1, mb["last_B"].to(values_BS.device)[:, None]).squeeze(1)
    return r_B[0::2] - r_B[1::2]


def _pairwise_loss_fn(totals: dict, ps: ParallelState) -> Callable:
    pairs = max(1.0, totals["pairs"])

    def loss_fn(values_BS: torch.Tensor, mb: dict) -> tuple:
        margin_P = _pair_margins(values_BS, mb)
        loss = -F.logsigmoid(margin_P).sum() / pairs
        return loss, {"accuracy": (margin_P > 0).double().sum() / pairs}

    return loss_fn


PAIRWISE_LOSS = LossSpec(units=lambda mb: {"pairs": torch.tensor(mb["input_ids_BS"].shape[0] / 2)}, build=_pairwise_loss_fn)
"""Bradley-Terry ``-log sigmoid(r_chosen - r_rejected)`` averaged over the pairs of the global batch."""


def rm_trainer_config(cfg: Config, pairs_per_step: int) -> Config:
    """``cfg`` for the reward-model trainer: a value head, ``pairs_per_step`` pairs (two rows each) per optimizer step."""
    out = copy.deepcopy(cfg)
    out.model.value_head = True
    out.train.global_batch_size = 2 * pairs_per_step
    out.train.micro_batch_size = min(out.train.micro_batch_size + out.train.micro_batch_size % 2, out.train.global_batch_size)
    return out


@torch.no_grad()
def evaluate(trainer: Trainer, model: RewardModel, pairs: Sequence[PreferencePair]) -> Optional[dict]:
    """Mean Bradley-Terry loss and accuracy over ``pairs`` (collective; the result lives on the last stage)."""
    margins = trainer.forward(pair_batch(model, pairs, trainer.ps.tp_size), lambda values, mb: _pair_margins(values, mb))
    if margins is None:
        return None
    return {"loss": float(-F.logsigmoid(margins).mean()), "accuracy": float((margins > 0).float().mean())}


def train_reward_model(trainer: Trainer, model: RewardModel, train: Sequence[PreferencePair], seed: int = 0,
                       eval_pairs: Optional[Sequence[PreferencePair]] = None, eval_every: int = 0,
                       log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """``trainer.cfg.train.steps`` steps of :data:`PAIRWISE_LOSS` on ``train`` (reshuffled every epoch, the same
    order on every rank, each dp rank training on its share of a step's pairs); returns the logged records.

    ``model`` tokenizes (its encoder and ``max_seq_len``); ``trainer`` must have been built with
    :func:`rm_trainer_config`. Every ``eval_every`` steps and at the end the held-out
    ``eval_pairs`` are scored; ``log(record)`` is called on the trainer's logging rank.
    """
    if not train:
        raise ValueError("train_reward_model: no training pairs")
    if not trainer.cfg.model.value_head:
        raise ConfigError("the reward-model trainer needs model.value_head=true; build its config with rm_trainer_config")
    if trainer.ps.layout.cp > 1:  # the pair margin reads each response's last token, which only one cp rank holds
        raise ConfigError(f"reward-model training with parallel.cp={trainer.ps.layout.cp}: preference pairs are short "
                          "and scored at their last token; fix: train the reward model with parallel.cp=1")
    ps, steps = trainer.ps, trainer.cfg.train.steps
    per_step = trainer.cfg.train.global_batch_size // 2
    local = per_step // ps.dp_size
    rng = random.Random(seed)
    history, order = [], []
    while trainer.step < steps:
        if len(order) < per_step:
            order += rng.sample(range(len(train)), len(train))
        step_pairs = [train[i] for i in order[:per_step]]
        del order[:per_step]
        mine = step_pairs[ps.dp_rank * local:(ps.dp_rank + 1) * local]
        metrics = trainer.train_step(pair_batch(model, mine, ps.tp_size), PAIRWISE_LOSS)
        if trainer.step == steps or (eval_every and trainer.step % eval_every == 0):
            record = {"step": trainer.step, **{k: metrics[k] for k in ("loss", "accuracy", "grad_norm", "lr")}}
            ev = evaluate(trainer, model, eval_pairs) if eval_pairs else None
            if ev is not None:
                record.update(eval_loss=ev["loss"], eval_accuracy=ev["accuracy"])
            history.append(record)
            if log is not None and trainer.is_logging_rank:
                log(record)
    for m in trainer.chunks:
        m.eval()
    return history


def save_reward_model(cfg: ModelConfig, state_dict: dict, path: str) -> None:
    """The one-process state dict plus the model config, written to a temporary name then renamed."""
    import dataclasses

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    torch.save({"model_config": dataclasses.asdict(cfg), "state_dict": state_dict}, tmp)
    tmp.replace(target)


class PairwiseRMScorer(BaseScorer):
    """Reward = win rate of a response against the rest of its group (or the reference response).

    Scores of (prompt, response) texts are cached (``cache_size`` entries), so scoring
    every member of a group costs one forward per distinct response.
    """

    def __init__(self, model: RewardModel, batch_size: int = 16, cache_size: int = 4096) -> None:
        self.model, self.batch_size, self.cache_size = model, batch_size, cache_size
        self._cache: dict = {}
        self._lock = threading.Lock()  # one forward at a time: the model is shared by the router's threads

    @torch.no_grad()
    def scores(self, prompt: str, responses: Sequence[str]) -> list[float]:
        """RM scores of ``responses`` to ``prompt`` (cached)."""
        with self._lock:
            todo = [r for r in dict.fromkeys(responses) if (prompt, r) not in self._cache]
            self.model.eval()
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i:i + self.batch_size]
                for r, s in zip(chunk, self.model([prompt] * len(chunk), chunk).tolist()):
                    if len(self._cache) >= self.cache_size:
                        self._cache.pop(next(iter(self._cache)))  # oldest first
                    self._cache[(prompt, r)] = s
            return [self._cache[(prompt, r)] for r in responses]

    def score(self, sample: ScoringSample) -> RewardResult:
        if not sample.response.strip():
            return RewardResult.failed("no_answer", "empty response")
        prompt = sample.prompt or sample.question
        others = [r for r in (sample.group or []) if r != sample.response and r.strip()]
        if not others and sample.reference is not None:
            others = [str(sample.reference)]
        if not others:
            raise ValueError("PairwiseRMScorer: nothing to compare with; set ScoringSample.group (the other "
                             "responses to the prompt) or ScoringSample.reference (a reference response)")
        mine, *theirs = self.scores(prompt, [sample.response] + others)
        win_rate = sum(0.5 * (1.0 + math.tanh((mine - t) / 2)) for t in theirs) / len(theirs)  # mean sigmoid
        return RewardResult(win_rate, win_rate > 0.5, f"win rate {win_rate:.3f} over {len(theirs)} comparisons")


def load_reward_model(path: str, encoder: Encoder) -> RewardModel:
    """The :class:`RewardModel` written by :func:`save_reward_model`; a bad file fails naming it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        cfg = config_from_dict({"model": payload["model_config"]}, validate=False).model
        validate_model(cfg)
        model = RewardModel(cfg, encoder)
        model.gpt.load_state_dict(payload["state_dict"])
    except Exception as e:  # unpickling a foreign file fails in many ways; every one names the file
        raise ValueError(f"{path}: not a reward-model checkpoint written by `megatron-seed train-rm --save` "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    model.eval()
    return model
