"""The shared scorer interface: a sample in, a :class:`RewardResult` out.

Every scorer (math verifier, code sandbox, LLM verifier, pairwise reward model) takes
a :class:`ScoringSample` and returns a :class:`RewardResult`. ``correct`` feeds the
positive-example LM loss (only responses judged correct are imitated); ``reason`` is a
short human-readable string for logs ("ok", "timeout after 5.0s", "2/3 tests passed").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class RewardResult:
    """Outcome of scoring one response."""

    reward: float
    correct: bool
    reason: str


@dataclass
class ScoringSample:
    """One response to score, with everything a scorer may need.

    ``question`` is the user-visible problem; ``prompt`` the full text fed to the
    policy (chat template included), kept for length accounting and logging.
    ``reference`` is the gold answer (math / LLM-verified) or a reference response
    (pairwise RM). ``tests`` are code unit tests (see :mod:`rl.rewards.code_reward`),
    ``checker`` an optional checker-script source. ``group`` holds the other responses
    to the same prompt, for pairwise scoring. ``response_tokens`` is the response
    length in tokens when known (overlong penalty).
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
