"""The shared scorer interface: a sample in, a :class:`RewardResult` out.

Every scorer (math verifier, exact-string scorer, code sandbox, LLM verifier, pairwise
reward model) takes a :class:`ScoringSample` and returns a :class:`RewardResult`.
``correct`` feeds the positive-example LM loss (only responses judged correct are
imitated); ``reason`` is a short human-readable string for logs ("ok", "timeout after
5.0s", "2/3 tests passed"); ``category`` is one of :data:`CATEGORIES`, the class of the
outcome that per-step metrics count (:func:`reason_counts`).

``masked`` marks a score that says nothing about the answer: the scorer could not judge
it (judge unreachable, sandbox failure, a scorer exception on a bad record). Such a
sample carries reward 0 only as a placeholder: the RL trainer must exclude it from the
policy and value losses (and from any statistic of the step's rewards), never train on
it as a negative. :func:`loss_mask` gives the per-sample keep flags.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

# Outcome classes, in the order metrics list them. The masked ones (scorer could not judge) come last.
CATEGORIES = (
    "passed",  # judged right (code: every test passed)
    "wrong_answer",  # judged wrong: a wrong value, a failed test, a rejected output
    "no_answer",  # no final answer could be found (format failure)
    "timeout",  # the candidate program or the check ran out of time
    "crash",  # the candidate program raised or was killed by a limit
    "hack_suspect",  # the response tried to fake a pass (exit tricks, hooks, verdict injection)
    "sandbox_error",  # masked: the sandbox itself failed
    "judge_error",  # masked: the LLM judge was unreachable or gave no verdict
    "scoring_error",  # masked: the scorer raised on this sample (e.g. a record without a reference)
)
MASKED_CATEGORIES = ("sandbox_error", "judge_error", "scoring_error")


@dataclass(frozen=True)
class RewardResult:
    """Outcome of scoring one response.

    ``category`` defaults to ``passed`` / ``wrong_answer`` from ``correct``; ``masked``
    defaults to whether the category is one of :data:`MASKED_CATEGORIES`.
    """

    reward: float
    correct: bool
    reason: str
    category: str = ""
    masked: Optional[bool] = None

    def __post_init__(self) -> None:
        if not self.category:
            object.__setattr__(self, "category", "passed" if self.correct else "wrong_answer")
        if self.category not in CATEGORIES:
            raise ValueError(f"RewardResult.category={self.category!r}: must be one of {', '.join(CATEGORIES)}")
        if self.masked is None:
            object.__setattr__(self, "masked", self.category in MASKED_CATEGORIES)
        if self.masked and (self.reward != 0.0 or self.correct):
            raise ValueError(f"a masked RewardResult must have reward 0 and correct=False (got {self.reward}, {self.correct})")

    @classmethod
    def failed(cls, category: str, reason: str) -> "RewardResult":
        """Reward 0, not correct, in ``category`` (masked when the category says the scorer could not judge)."""
        return cls(0.0, False, reason, category)


def reason_counts(results: Sequence[RewardResult]) -> dict:
    """``{category: count}`` over ``results`` for every category in :data:`CATEGORIES` (zeros included),
    plus ``masked``: how many results the trainer must leave out of the loss."""
    counts = Counter(r.category for r in results)
    out = {c: counts.get(c, 0) for c in CATEGORIES}
    out["masked"] = sum(bool(r.masked) for r in results)
    return out


def loss_mask(results: Sequence[RewardResult]) -> list:
    """One flag per result: True = train on it, False = masked (the score says nothing about the answer)."""
    return [not r.masked for r in results]


@dataclass
class ScoringSample:
    """One response to score, with everything a scorer may need.

    ``question`` is the user-visible problem; ``prompt`` the full text fed to the
    policy (chat template included), kept for length accounting and logging.
    ``reference`` is the gold answer (math / LLM-verified) or a reference response
    (pairwise RM). ``tests`` are code unit tests (see :mod:`rl.rewards.code_reward`),
    ``checker`` an optional checker (the :mod:`data.checkers` contract). ``group`` holds
    the other responses to the same prompt, for pairwise scoring (the router fills it
    from the batch when it is not given). ``response_tokens`` is the response length in
    tokens when known (overlong penalty).
    """

    response: str
    question: str = ""
    prompt: str = ""
    reference: Optional[str] = None
    domain: Optional[str] = None
    tests: Optional[list] = None
    checker: Optional[str] = None
    group: Optional[list] = None
    response_tokens: Optional[int] = None
    metadata: dict = field(default_factory=dict)


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores samples; ``score_batch`` may batch or parallelise."""

    def score(self, sample: ScoringSample) -> RewardResult: ...

    def score_batch(self, samples: Sequence[ScoringSample]) -> list[RewardResult]: ...


class BaseScorer:
    """Default ``score_batch``: one ``score`` call per sample, in order."""

    def score(self, sample: ScoringSample) -> RewardResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_batch(self, samples: Sequence[ScoringSample]) -> list[RewardResult]:
        return [self.score(s) for s in samples]


def require_field(sample: ScoringSample, name: str, scorer: str) -> Any:
    """Return ``sample.<name>``, or raise ValueError naming the missing field and the fix."""
    value = getattr(sample, name)
    if value is None:
        raise ValueError(f"{scorer}: sample has no '{name}'; set ScoringSample.{name} (domain={sample.domain!r})")
    return value
