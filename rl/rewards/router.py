"""Reward router: one scorer per sample, a whole batch scored concurrently, overlong penalty.

Routes (keys of ``scorers``): ``math`` (rule verifier), ``code`` (sandbox), ``llm``
(model verifier for other verifiable answers), ``pairwise`` (reward model for
non-verifiable prompts). A sample goes to, in order:

1. its ``domain`` if that is a route name, or the route an alias maps it to
   (``verifiable``/``stem``/``general`` -> llm, ``chat``/``creative``/``non-verifiable`` -> pairwise);
2. ``code`` if it carries unit tests;
3. ``math`` if it has a reference answer and no ``llm`` scorer is configured, else ``llm``;
4. ``pairwise`` (no reference: nothing to verify against).

Overlong penalty (DAPO-style soft punishment): with ``max_length`` L and ``buffer`` B,
a response of length n loses ``penalty * clip((n - (L - B)) / B, 0, 1)`` (the whole
``penalty`` when B = 0 and n > L). Length is ``response_tokens`` when known, else
``length_fn(response)`` (characters by default).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from rl.rewards.base import RewardResult, Scorer, ScoringSample

ROUTES = ("math", "code", "llm", "pairwise")
ALIASES = {"verifiable": "llm", "stem": "llm", "general": "llm", "chat": "pairwise", "creative": "pairwise",
           "non-verifiable": "pairwise", "nonverifiable": "pairwise", "programming": "code"}


@dataclass
class RouterConfig:
    max_length: Optional[int] = None  # overlong threshold; None = no penalty
    overlong_penalty: float = 0.0  # subtracted in full beyond max_length
    overlong_buffer: int = 0  # linear ramp of the penalty over the last `buffer` lengths
    workers: int = 8  # samples scored at once
    progress: bool = True  # tqdm bar

    def validate(self) -> None:
        if self.overlong_penalty < 0:
            raise ValueError(f"RouterConfig.overlong_penalty must be >= 0, got {self.overlong_penalty}")
        if self.max_length is not None and not 0 <= self.overlong_buffer < self.max_length:
            raise ValueError(f"RouterConfig.overlong_buffer must be in [0, max_length={self.max_length}), "
                             f"got {self.overlong_buffer}")
        if self.workers < 1:
            raise ValueError(f"RouterConfig.workers must be >= 1, got {self.workers}")


class RewardRouter:
    """Dispatches samples to the scorer of their route; results come back in input order."""

    def __init__(self, scorers: Mapping[str, Scorer], config: Optional[RouterConfig] = None,
                 length_fn: Callable[[str], int] = len) -> None:
        unknown = set(scorers) - set(ROUTES)
        if unknown:
            raise ValueError(f"RewardRouter: unknown route(s) {sorted(unknown)}; routes are {list(ROUTES)}")
        self.scorers = dict(scorers)
        self.config = config or RouterConfig()
        self.config.validate()
        self.length_fn = length_fn

    def route(self, sample: ScoringSample) -> str:
        domain = (sample.domain or "").lower()
        if domain in ROUTES:
            name = domain
        elif domain in ALIASES:
            name = ALIASES[domain]
        elif sample.tests:
            name = "code"
        elif sample.reference is not None:
            name = "llm" if "llm" in self.scorers else "math"
        else:
            name = "pairwise"
        if name not in self.scorers:
            raise ValueError(f"RewardRouter: sample (domain={sample.domain!r}) routes to '{name}' but no '{name}' "
                             f"scorer was given; configured: {sorted(self.scorers)}")
        return name

    def overlong_penalty(self, sample: ScoringSample) -> float:
        """The penalty for this sample's length (0 when within limits)."""
        cfg = self.config
        if cfg.max_length is None or cfg.overlong_penalty == 0:
            return 0.0
        n = sample.response_tokens if sample.response_tokens is not None else self.length_fn(sample.response)
        if cfg.overlong_buffer == 0:
            return cfg.overlong_penalty if n > cfg.max_length else 0.0
        ramp = (n - (cfg.max_length - cfg.overlong_buffer)) / cfg.overlong_buffer
        return cfg.overlong_penalty * min(1.0, max(0.0, ramp))

    def score(self, sample: ScoringSample) -> RewardResult:
        route = self.route(sample)
        result = self.scorers[route].score(sample)
        penalty = self.overlong_penalty(sample)
        if penalty:
            result = RewardResult(result.reward - penalty, result.correct, f"{result.reason}; overlong: -{penalty:.3g}")
        return RewardResult(result.reward, result.correct, f"[{route}] {result.reason}")

    def score_batch(self, samples: Sequence[ScoringSample]) -> list[RewardResult]:
        """Score every sample concurrently (``workers`` threads) with a progress bar; input order kept."""
        for i, s in enumerate(samples):  # fail fast on unroutable samples, before any work starts
            try:
                self.route(s)
            except ValueError as e:
                raise ValueError(f"sample {i}: {e}") from None
        results: list = [None] * len(samples)
        bar = None
        if self.config.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), desc="rewards", unit="sample", leave=False)
        with ThreadPoolExecutor(min(self.config.workers, max(1, len(samples)))) as pool:
            futures = {pool.submit(self.score, s): i for i, s in enumerate(samples)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as e:
                    raise RuntimeError(f"scoring sample {i} (domain={samples[i].domain!r}) failed: {e}") from e
                finally:
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return results
