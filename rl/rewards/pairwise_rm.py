"""Pairwise reward model: a GPT-MoE with a scalar head, trained on preference pairs.

Score of a (prompt, response) text: the value head's output at the last real token
(``model.value_head=True`` makes :class:`GPTModel` return ``values_BS``; sequences are
right-padded, so causal attention never sees the padding). Training minimises the
Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``; accuracy is the share of
pairs with ``r_chosen > r_rejected``.

Scoring for non-verifiable prompts (:class:`PairwiseRMScorer`): a response is compared
with every other response of its group (``ScoringSample.group``), or with the
reference response when there is no group; its reward is the win rate
``mean_j sigmoid(r_i - r_j)`` (the Bradley-Terry probability of winning each duel).
Single process; the model and optimiser are ordinary torch modules.
"""
from __future__ import annotations

import json
import math
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from megatron_seed.config import ModelConfig
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
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


def bradley_terry_loss(r_chosen_B: torch.Tensor, r_rejected_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean ``-log sigmoid(r_c - r_r)``, accuracy = mean ``[r_c > r_r]``)."""
    margin_B = r_chosen_B - r_rejected_B
    return -F.logsigmoid(margin_B).mean(), (margin_B > 0).float().mean()


class RewardModel(torch.nn.Module):
    """GPT-MoE with a scalar head; ``forward`` gives one score per sequence."""

    def __init__(self, cfg: ModelConfig, encoder: Encoder, seed: int = 0,
                 ps: Optional[ParallelState] = None) -> None:
        super().__init__()
        if not cfg.value_head:
            raise ValueError("RewardModel: model.value_head must be true (the scalar head replaces the LM head)")
        if encoder.vocab_size > cfg.vocab_size:
            raise ValueError(f"RewardModel: tokenizer has {encoder.vocab_size} ids but model.vocab_size is "
                             f"{cfg.vocab_size}; set model.vocab_size >= {encoder.vocab_size}")
        self.cfg, self.encoder = cfg, encoder
        self.pad_id = getattr(encoder, "pad_id", 0)
        self.gpt = GPTModel(cfg, ps or ParallelState.single())
        self.gpt.init_weights(seed)

    def tokenize(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``ids_BS`` and the index of each sequence's last real token ``last_B``.

        Over-long sequences keep their end (the response matters most): the prompt is cut from the left.
        """
        seqs = []
        for p, r in zip(prompts, responses):
            ids = self.encoder.encode(p + RESPONSE_SEPARATOR + r) or [self.pad_id]
            seqs.append(ids[-self.cfg.max_seq_len:])
        S = max(len(s) for s in seqs)
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

    def pair_loss(self, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bradley-Terry loss and accuracy of a batch of pairs (chosen and rejected in one forward)."""
        prompts = [p.prompt for p in pairs] * 2
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        r_B = self(prompts, responses)
        return bradley_terry_loss(r_B[:len(pairs)], r_B[len(pairs):])


@dataclass
class RMTrainConfig:
    steps: int = 200
    batch_size: int = 16  # pairs per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50  # 0 = only at the end


@torch.no_grad()
def evaluate(model: RewardModel, pairs: Sequence[PreferencePair], batch_size: int = 64) -> dict:
    """Mean Bradley-Terry loss and accuracy over ``pairs``."""
    was_training = model.training
    model.eval()
    loss_sum, acc_sum = 0.0, 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        loss, acc = model.pair_loss(chunk)
        loss_sum += loss.item() * len(chunk)
        acc_sum += acc.item() * len(chunk)
    model.train(was_training)
    return {"loss": loss_sum / len(pairs), "accuracy": acc_sum / len(pairs)}


def train_reward_model(model: RewardModel, train: Sequence[PreferencePair], cfg: RMTrainConfig,
                       eval_pairs: Optional[Sequence[PreferencePair]] = None,
                       log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """AdamW on the Bradley-Terry loss with linear warm-up then cosine decay; returns the logged records."""
    if not train:
        raise ValueError("train_reward_model: no training pairs")
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    history = []
    order: list = []
    model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(train)), len(train))
        batch = [train[i] for i in order[:cfg.batch_size]]
        del order[:cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, acc = model.pair_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"reward-model loss is {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        last = step == cfg.steps - 1
        if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            record = {"step": step + 1, "loss": loss.item(), "accuracy": acc.item(), "lr": lr_at(step)}
            if eval_pairs:
                ev = evaluate(model, eval_pairs)
                record.update(eval_loss=ev["loss"], eval_accuracy=ev["accuracy"])
            history.append(record)
            if log is not None:
                log(record)
    model.eval()
    return history


def save_reward_model(model: RewardModel, path: str) -> None:
    """State dict plus the model config, written to a temporary name then renamed."""
    import dataclasses

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    torch.save({"model_config": dataclasses.asdict(model.cfg), "state_dict": model.gpt.state_dict()}, tmp)
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
        prompt = sample.prompt or sample.question
        others = [r for r in (sample.group or []) if r != sample.response]
        if not others and sample.reference is not None:
            others = [str(sample.reference)]
        if not others:
            raise ValueError("PairwiseRMScorer: nothing to compare with; set ScoringSample.group (the other "
                             "responses to the prompt) or ScoringSample.reference (a reference response)")
        mine, *theirs = self.scores(prompt, [sample.response] + others)
        win_rate = sum(0.5 * (1.0 + math.tanh((mine - t) / 2)) for t in theirs) / len(theirs)  # mean sigmoid
        return RewardResult(win_rate, win_rate > 0.5, f"win rate {win_rate:.3f} over {len(theirs)} comparisons")
