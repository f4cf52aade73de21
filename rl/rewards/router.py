"""Reward router: one scorer per sample, a whole batch scored concurrently, overlong penalty.

Routes (keys of ``scorers``): ``math`` (rule verifier, numeric / symbolic answers),
``exact`` (exact-string answers: word lists, reversed words), ``verify`` (the policy's
keyed verdict on a verifier task against its YES/NO label),
``code`` (sandbox), ``llm`` (model verifier for other verifiable answers), ``pairwise``
(reward model for non-verifiable prompts). A sample goes to, in order:

1. its ``domain`` if that is a route name, or the route an alias maps it to
   (``puzzle`` -> exact, ``verifiable``/``stem``/``general`` -> llm,
   ``chat``/``creative``/``non-verifiable`` -> pairwise, ``programming`` -> code);
2. ``code`` if it carries unit tests;
3. ``math`` if it has a reference answer and no ``llm`` scorer is configured, else ``llm``;
4. ``pairwise`` (no reference: nothing to verify against).

A scorer that raises on one sample (a record without a reference, an empty test list)
gives that sample a masked ``scoring_error`` result with the reason; the rest of the
batch is scored as usual. Pairwise samples without a ``group`` get the other responses
to the same prompt in the batch as their group.

Overlong penalty (DAPO-style soft punishment): with ``max_length`` L and ``buffer`` B,
a response of length n loses ``penalty * clip((n - (L - B)) / B, 0, 1)`` (the whole
``penalty`` when B = 0 and n > L); masked results are left at 0. Length is
``response_tokens`` when known, else ``length_fn(response)`` (characters by default).
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from rl.rewards.base import RewardResult, Scorer, ScoringSample

ROUTES = ("math", "exact", "verify", "code", "llm", "pairwise")
ALIASES = {"puzzle": "exact", "verifiable": "llm", "stem": "llm", "general": "llm",
           "chat": "pairwise", "creative": "pairwise", "non-verifiable": "pairwise", "nonverifiable": "pairwise",
           "programming": "code"}


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


def route_of(sample: ScoringSample, has_llm: bool) -> str:
    """The route name of ``sample`` by the rules of the module docstring (whether or not it is configured)."""
    domain = (sample.domain or "").lower()
    if domain in ROUTES:
        return domain
    if domain in ALIASES:
        return ALIASES[domain]
    if sample.tests:
        return "code"
    if sample.reference is not None:
        return "llm" if has_llm else "math"
    return "pairwise"


class RewardRouter:
    """Dispatches samples to the scorer of their route; results come back in input order.

    A scorer with a true ``batched`` attribute (the LLM verifier: one judge call for many
    prompts) gets all its samples in one ``score_batch`` call; the others are scored one
    sample per task on ``workers`` threads.
    """

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
        name = route_of(sample, "llm" in self.scorers)
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

    def _finish(self, route: str, sample: ScoringSample, result: RewardResult) -> RewardResult:
        """Apply the overlong penalty and prefix the route to the reason."""
        reason = result.reason
        reward = result.reward
        penalty = 0.0 if result.masked else self.overlong_penalty(sample)
        if penalty:
            reward -= penalty
            reason = f"{reason}; overlong: -{penalty:.3g}"
        return dataclasses.replace(result, reward=reward, reason=f"[{route}] {reason}")

    @staticmethod
    def _scoring_error(error: BaseException) -> RewardResult:
        return RewardResult.failed("scoring_error", f"scorer failed: {type(error).__name__}: {error}"[:300])

    def score(self, sample: ScoringSample) -> RewardResult:
        """Score one sample; a scorer exception becomes a masked ``scoring_error`` result."""
        route = self.route(sample)
        try:
            result = self.scorers[route].score(sample)
        except Exception as e:  # one bad record must not abort the batch (and the run)
            result = self._scoring_error(e)
        return self._finish(route, sample, result)

    def score_batch(self, samples: Sequence[ScoringSample]) -> list[RewardResult]:
        """Score every sample concurrently (``workers`` threads) with a progress bar; input order kept."""
        routes = []
        for i, s in enumerate(samples):  # fail fast on unroutable samples (a configuration error), before any work
            try:
                routes.append(self.route(s))
            except ValueError as e:
                raise ValueError(f"sample {i}: {e}") from None
        samples = _with_groups(samples, routes)
        results: list = [None] * len(samples)
        bar = None
        if self.config.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), desc="rewards", unit="sample", leave=False)

        def score_one(i: int) -> None:
            results[i] = self.score(samples[i])
            if bar is not None:
                bar.update(1)

        def score_route(route: str, index: list) -> None:
            try:
                scored = self.scorers[route].score_batch([samples[i] for i in index])
            except Exception as e:
                scored = [self._scoring_error(e)] * len(index)
            for i, result in zip(index, scored):
                results[i] = self._finish(route, samples[i], result)
            if bar is not None:
                bar.update(len(index))

        batched = {r for r in set(routes) if getattr(self.scorers[r], "batched", False)}
        with ThreadPoolExecutor(min(self.config.workers, max(1, len(samples)))) as pool:
            futures = [pool.submit(score_route, r, [i for i, x in enumerate(routes) if x == r]) for r in batched]
            futures += [pool.submit(score_one, i) for i, r in enumerate(routes) if r not in batched]
            for future in futures:
                future.result()
        if bar is not None:
            bar.close()
        return results


def _with_groups(samples: Sequence[ScoringSample], routes: Sequence[str]) -> list:
    """Pairwise samples without a ``group`` get the other responses to the same prompt in the batch."""
    by_prompt: dict = {}
    for s, r in zip(samples, routes):
        if r == "pairwise":
            by_prompt.setdefault((s.question, s.prompt), []).append(s.response)
    out = []
    for s, r in zip(samples, routes):
        if r == "pairwise" and s.group is None and len(by_prompt[(s.question, s.prompt)]) > 1:
            s = dataclasses.replace(s, group=list(by_prompt[(s.question, s.prompt)]))
        out.append(s)
    return out
