"""Prompt filtering rules: sampled scores per prompt in, keep/drop with a reason out.

The rollout side (``megatron-seed filter`` in ``rl/``) samples N responses per prompt
and scores them; these rules decide, per prompt:

- verifiable prompts (a rule verifier says right/wrong): ``pass_rate = correct / N``;
  dropped as ``too_easy`` when ``pass_rate >= easy_pass_rate`` (default 1.0: all N
  correct, nothing left to learn) and as ``too_hard`` when ``pass_rate <=
  hard_pass_rate`` (default None: never; set 0.0 to drop prompts no sample solves);
- non-verifiable prompts (scored by a reward model): dropped as ``low_variance``
  when the population variance of their N scores is below ``min_score_variance``:
  the reward model cannot tell the samples apart, so the prompt carries no signal.

:class:`FilterReport` counts decisions per domain and reason.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

KEPT, TOO_EASY, TOO_HARD, LOW_VARIANCE = "kept", "too_easy", "too_hard", "low_variance"
REASONS = (KEPT, TOO_EASY, TOO_HARD, LOW_VARIANCE)


@dataclass
class FilterConfig:
    easy_pass_rate: float = 1.0  # drop verifiable prompts with pass rate >= this
    hard_pass_rate: Optional[float] = None  # drop verifiable prompts with pass rate <= this; None = keep all
    min_score_variance: float = 1e-3  # drop non-verifiable prompts whose score variance is below this
    correct_threshold: float = 0.5  # a reward >= this counts as correct when no correct flags are given

    def __post_init__(self) -> None:
        if not 0.0 < self.easy_pass_rate <= 1.0:
            raise ValueError(f"easy_pass_rate={self.easy_pass_rate}: must be in (0, 1] (1.0 = drop only all-correct prompts)")
        if self.hard_pass_rate is not None and not 0.0 <= self.hard_pass_rate < self.easy_pass_rate:
            raise ValueError(f"hard_pass_rate={self.hard_pass_rate}: must be in [0, easy_pass_rate={self.easy_pass_rate}) or None")
        if self.min_score_variance < 0:
            raise ValueError(f"min_score_variance={self.min_score_variance}: must be >= 0")


@dataclass
class PromptScores:
    """N sampled responses of one prompt: their rewards and, for rule-verified prompts, correct flags."""

    prompt_id: str
    domain: str
    verifiable: bool
    rewards: Sequence[float]
    correct: Optional[Sequence[bool]] = None


@dataclass
class FilterDecision:
    prompt_id: str
    domain: str
    keep: bool
    reason: str
    pass_rate: Optional[float]  # verifiable prompts only
    score_variance: float


def _variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def decide(scores: PromptScores, cfg: FilterConfig) -> FilterDecision:
    """Apply the rules of the module docstring to one prompt."""
    n = len(scores.rewards)
    if n == 0:
        raise ValueError(f"prompt {scores.prompt_id}: no sampled rewards; sample at least one response per prompt")
    if scores.correct is not None and len(scores.correct) != n:
        raise ValueError(f"prompt {scores.prompt_id}: {len(scores.correct)} correct flags for {n} rewards")
    variance = _variance([float(r) for r in scores.rewards])
    if scores.verifiable:
        flags = scores.correct if scores.correct is not None else [r >= cfg.correct_threshold for r in scores.rewards]
        pass_rate = sum(bool(c) for c in flags) / n
        if pass_rate >= cfg.easy_pass_rate:
            reason = TOO_EASY
        elif cfg.hard_pass_rate is not None and pass_rate <= cfg.hard_pass_rate:
            reason = TOO_HARD
        else:
            reason = KEPT
    else:
        pass_rate = None
        reason = LOW_VARIANCE if variance < cfg.min_score_variance else KEPT
    return FilterDecision(scores.prompt_id, scores.domain, reason == KEPT, reason, pass_rate, variance)


@dataclass
class FilterReport:
    counts: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))  # domain -> reason -> n

    def add(self, decision: FilterDecision) -> None:
        self.counts[decision.domain][decision.reason] += 1

    def total(self, reason: Optional[str] = None) -> int:
        return sum(c[reason] if reason else sum(c.values()) for c in self.counts.values())

    def to_dict(self) -> dict:
        return {domain: {r: c[r] for r in REASONS} for domain, c in sorted(self.counts.items())}

    def format(self) -> str:
        """A table: one row per domain and a total, one column per reason."""
        header = f"{'domain':<16}" + "".join(f"{r:>14}" for r in REASONS) + f"{'total':>10}"
        rows = [header]
        for domain, c in sorted(self.counts.items()):
            rows.append(f"{domain:<16}" + "".join(f"{c[r]:>14}" for r in REASONS) + f"{sum(c.values()):>10}")
        rows.append(f"{'all':<16}" + "".join(f"{self.total(r):>14}" for r in REASONS) + f"{self.total():>10}")
        return "\n".join(rows)

    def to_json(self) -> str:
        return json.dumps({"per_domain": self.to_dict(), "total": {r: self.total(r) for r in REASONS}}, indent=2)


def filter_prompts(scores: Iterable[PromptScores], cfg: Optional[FilterConfig] = None) -> tuple:
    """``(decisions, report)`` for a stream of per-prompt scores."""
    cfg = cfg or FilterConfig()
    report = FilterReport()
    decisions = []
    for s in scores:
        d = decide(s, cfg)
        report.add(d)
        decisions.append(d)
    return decisions, report


def kept_records(records: Iterable, decisions: Iterable[FilterDecision]) -> list:
    """The prompt records (anything with ``.id``) whose decision is keep, in input order."""
    keep = {d.prompt_id for d in decisions if d.keep}
    return [r for r in records if r.id in keep]
