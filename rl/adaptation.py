"""Online data distribution adaptation: a prompt sampler whose domain weights follow training signals.

Seed1.5-Thinking turns the fixed mix of RL prompt domains (math, code, non-verifiable,
...) into one that adapts to what the policy currently needs. After each rollout
step the trainer reports, per domain, the rewards of the sampled groups (``G``
prompts x ``K`` responses each). From them :func:`domain_signals` measures

* ``reward_mean``: mean reward;
* ``reward_var``: mean within-group reward variance (the spread advantages can use);
* ``zero_var_frac``: fraction of groups whose responses all got the same reward
  (they carry no learning signal);
* ``learnability``: mean over groups of ``p (1 - p)``, ``p`` the group's pass rate
  (fraction of responses marked correct; without correctness flags, the group's
  mean reward clamped to ``[0, 1]``, which is the pass rate for 0/1 rewards).
  It peaks at ``p = 1/2`` and vanishes for prompts always or never solved.

Each signal is smoothed per domain by an exponential moving average
``s <- ema * s + (1 - ema) * s_step`` (``rl.adaptation_ema``; the first observation
is taken as is). The rule (``rl.adaptation_rule``) turns the smoothed signals into
a score per domain:

* ``learnability``: ``score = learnability``;
* ``reward``: ``score = max(0, 1 - reward_mean)``, the headroom left (rewards in ``[0, 1]``);
* ``uniform``: ``score = 1``.

A domain not observed yet gets the highest score among the observed ones (so it is
explored). With ``target = score / sum(score)`` (uniform when all scores are 0) the
weights move by ``w <- (1 - rate) * w + rate * target`` (``rl.adaptation_rate``) and
are then projected onto ``{w : sum w = 1, min_weight <= w <= max_weight}``
(Euclidean projection: ``w_i = clip(v_i + tau, min, max)`` with ``tau`` found by
bisection), so the bounds hold exactly after normalisation.

Sampling is streaming: each domain's source is a sequence (read in a fresh seeded
shuffle every epoch) or a re-iterable (read in order, restarted when exhausted).
:meth:`DomainSampler.state_dict` holds the weights, the signal averages, the RNG
state and each domain's read position, so a resumed sampler draws the same prompts
with the same weights. Under data parallelism every rank holds an identical sampler
fed the same global rewards, draws the same prompts and takes its shard.
"""
from __future__ import annotations

import random
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from megatron_seed.config import ConfigError, RLConfig

RULES = ("learnability", "reward", "uniform")
SIGNALS = ("reward_mean", "reward_var", "zero_var_frac", "learnability")


@dataclass(frozen=True)
class SampledPrompt:
    """One drawn prompt: the domain it came from and the source's record, unchanged."""

    domain: str
    record: Any


def domain_signals(rewards_GK: Any, correct_GK: Any = None) -> dict:
    """The step's signals of one domain from ``G`` groups of ``K`` rewards (see the module docstring)."""
    rewards = torch.as_tensor(rewards_GK, dtype=torch.float64)
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty [groups, samples_per_prompt] array, got shape {tuple(rewards.shape)}")
    if correct_GK is not None:
        correct = torch.as_tensor(correct_GK)
        if correct.shape != rewards.shape:
            raise ValueError(f"correct has shape {tuple(correct.shape)} but rewards has {tuple(rewards.shape)}")
        pass_rate_G = correct.to(torch.float64).mean(dim=1)
    else:
        pass_rate_G = rewards.mean(dim=1).clamp(0.0, 1.0)
    spread_G = rewards.amax(dim=1) - rewards.amin(dim=1)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_var": rewards.var(dim=1, unbiased=False).mean().item(),
        "zero_var_frac": (spread_G == 0).to(torch.float64).mean().item(),
        "learnability": (pass_rate_G * (1.0 - pass_rate_G)).mean().item(),
    }


def project_to_bounds(weights: Sequence[float], min_weight: float, max_weight: float) -> list:
    """Euclidean projection of ``weights`` onto ``{sum = 1, min <= w <= max}``: ``w_i = clip(v_i + tau, min, max)``."""
    n = len(weights)
    if not n * min_weight <= 1.0 <= n * max_weight:
        raise ConfigError(
            f"{n} domains cannot have weights within [{min_weight}, {max_weight}] summing to 1; "
            f"fix: rl.adaptation_min_weight <= {1.0 / n:.4g} <= rl.adaptation_max_weight"
        )
    lo, hi = min_weight - max(weights), max_weight - min(weights)  # total(lo) = n * min <= 1 <= n * max = total(hi)
    for _ in range(100):  # the bracket starts at most 2 wide: 2^-100 is far below float64 resolution
        tau = 0.5 * (lo + hi)
        if sum(min(max(v + tau, min_weight), max_weight) for v in weights) < 1.0:
            lo = tau
        else:
            hi = tau
    return [min(max(v + hi, min_weight), max_weight) for v in weights]


class _DomainStream:
    """Endless, resumable reader of one domain's prompts."""

    def __init__(self, name: str, source: Iterable, seed: int, shuffle: bool):
        self.name, self.source, self.seed = name, source, seed
        self.indexable = isinstance(source, SequenceABC) and not isinstance(source, (str, bytes))
        self.shuffle = shuffle and self.indexable
        if self.indexable and len(source) == 0:
            raise ValueError(f"domain {name!r} has no prompts; fix: drop it or give it prompts")
        self.epoch, self.position = 0, 0
        self._order: Optional[list] = None
        self._iter: Optional[Iterator] = None

    def _epoch_order(self) -> list:
        order = list(range(len(self.source)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.name}/{self.epoch}").shuffle(order)
        return order

    def _open_iterator(self) -> Iterator:
        it = iter(self.source)
        if it is self.source and (self.epoch > 0 or self.position > 0) and self._iter is not None:
            raise ValueError(f"domain {self.name!r}: its prompt iterator ran out and cannot restart; "
                             "fix: pass a list or a re-iterable (an object whose __iter__ starts over)")
        return it

    def next(self) -> Any:
        if self.indexable:
            if self.position >= len(self.source):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            if self._order is None:
                self._order = self._epoch_order()
            record = self.source[self._order[self.position]]
        else:
            if self._iter is None:
                self._iter = self._open_iterator()
            try:
                record = next(self._iter)
            except StopIteration:
                if self.position == 0:
                    raise ValueError(f"domain {self.name!r} has no prompts; fix: drop it or give it prompts") from None
                self.epoch, self.position = self.epoch + 1, 0
                self._iter = self._open_iterator()
                return self.next()
        self.position += 1
        return record

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: Mapping) -> None:
        """Continue where ``state`` left off; a stream source is re-opened and fast-forwarded."""
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
        if not self.indexable:
            self._iter = iter(self.source)
            for i in range(self.position):
                try:
                    next(self._iter)
                except StopIteration:
                    raise ValueError(f"domain {self.name!r}: cannot fast-forward to position {self.position}, "
                                     f"the source ended after {i}; fix: resume with the same prompt source") from None


class DomainSampler:
    """Draws prompts from several domains with adaptive weights (rule in the module docstring).

    ``sources`` maps a domain name to its prompts (list or re-iterable). ``initial_weights``
    (default uniform) are projected onto the bounds. ``seed`` fixes the draws and
    each domain's shuffles.
    """

    def __init__(
        self,
        sources: Mapping[str, Iterable],
        cfg: RLConfig,
        seed: int = 0,
        initial_weights: Optional[Mapping[str, float]] = None,
        shuffle: bool = True,
    ):
        if not sources:
            raise ValueError("DomainSampler needs at least one domain in sources")
        if cfg.adaptation_rule not in RULES:
            raise ConfigError(f"rl.adaptation_rule={cfg.adaptation_rule!r}: must be one of {', '.join(RULES)}")
        if not 0 <= cfg.adaptation_ema < 1 or not 0 <= cfg.adaptation_rate <= 1:
            raise ConfigError(f"rl.adaptation_ema={cfg.adaptation_ema} must be in [0, 1) and "
                              f"rl.adaptation_rate={cfg.adaptation_rate} in [0, 1]")
        self.cfg = cfg
        self.seed = seed
        self.domains = list(sources)
        self.streams = {d: _DomainStream(d, sources[d], seed, shuffle) for d in self.domains}
        self.rng = random.Random(seed)
        if initial_weights is not None:
            unknown = set(initial_weights) - set(self.domains)
            if unknown or any(initial_weights.get(d, 0.0) < 0 for d in self.domains):
                raise ValueError(f"initial_weights must be >= 0 and name only the domains {self.domains}; got {dict(initial_weights)}")
            total = sum(initial_weights.get(d, 0.0) for d in self.domains)
            if total <= 0:
                raise ValueError(f"initial_weights sum to {total}; give at least one domain a positive weight")
            raw = [initial_weights.get(d, 0.0) / total for d in self.domains]
        else:
            raw = [1.0 / len(self.domains)] * len(self.domains)
        self.weights = dict(zip(self.domains, project_to_bounds(raw, cfg.adaptation_min_weight, cfg.adaptation_max_weight)))
        self.signals: dict = {d: None for d in self.domains}  # EMA of SIGNALS per domain; None = never observed
        self.updates = 0

    # ------------------------------------------------------------------ drawing
    def sample(self, n: int) -> list:
        """Draw ``n`` prompts: each picks a domain by the current weights, then that domain's next prompt."""
        picks = self.rng.choices(self.domains, weights=[self.weights[d] for d in self.domains], k=n)
        return [SampledPrompt(d, self.streams[d].next()) for d in picks]

    def __iter__(self) -> Iterator[SampledPrompt]:
        while True:
            yield self.sample(1)[0]

    # ------------------------------------------------------------------ adapting
    def _score(self, smoothed: dict) -> float:
        rule = self.cfg.adaptation_rule
        if rule == "learnability":
            return max(0.0, smoothed["learnability"])
        if rule == "reward":
            return max(0.0, 1.0 - smoothed["reward_mean"])
        return 1.0

    def update(self, rewards: Mapping[str, Any], correct: Optional[Mapping[str, Any]] = None) -> dict:
        """Fold one step's rewards (``{domain: [G, K]}``, domains not drawn may be left out) into the weights.

        ``correct`` optionally gives matching bool arrays (the verifier's verdicts) for
        the pass rates. Returns :meth:`metrics`.
        """
        unknown = set(rewards) - set(self.domains)
        if unknown:
            raise ValueError(f"rewards for unknown domains {sorted(unknown)}; the sampler has {self.domains}")
        ema = self.cfg.adaptation_ema
        for d, r in rewards.items():
            step = domain_signals(r, None if correct is None else correct.get(d))
            old = self.signals[d]
            self.signals[d] = step if old is None else {k: ema * old[k] + (1 - ema) * step[k] for k in SIGNALS}
        observed = {d: self._score(s) for d, s in self.signals.items() if s is not None}
        best = max(observed.values(), default=1.0)
        scores = [observed.get(d, best) for d in self.domains]
        total = sum(scores)
        target = [s / total for s in scores] if total > 0 else [1.0 / len(scores)] * len(scores)
        rate = self.cfg.adaptation_rate
        mixed = [(1 - rate) * self.weights[d] + rate * t for d, t in zip(self.domains, target)]
        self.weights = dict(zip(self.domains, project_to_bounds(mixed, self.cfg.adaptation_min_weight, self.cfg.adaptation_max_weight)))
        self.updates += 1
        return self.metrics()

    def metrics(self) -> dict:
        """Flat ``{name: float}`` for the metrics logger: weights and smoothed signals per domain."""
        out = {f"adapt/weight/{d}": w for d, w in self.weights.items()}
        for d, s in self.signals.items():
            if s is not None:
                out.update({f"adapt/{k}/{d}": v for k, v in s.items()})
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "domains": list(self.domains),
            "weights": dict(self.weights),
            "signals": {d: (dict(s) if s is not None else None) for d, s in self.signals.items()},
            "updates": self.updates,
            "seed": self.seed,
            "rng": [version, list(internal), gauss],
            "streams": {d: s.state() for d, s in self.streams.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["domains"]) != self.domains:
            raise ValueError(f"checkpoint sampler has domains {list(state['domains'])} but this one has {self.domains}; "
                             "fix: build the sampler with the same domains in the same order")
        self.weights = {d: float(state["weights"][d]) for d in self.domains}
        self.signals = {d: (dict(s) if s is not None else None) for d, s in state["signals"].items()}
        self.updates = int(state["updates"])
        self.seed = int(state["seed"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for d, s in state["streams"].items():
            self.streams[d].seed = self.seed  # the shuffles of later epochs follow the checkpoint's seed
            self.streams[d].restore(s)


def split_by_domain(records: Iterable, field: str = "domain") -> dict:
    """Group records (e.g. :class:`data.prompts.PromptRecord`) into ``{domain: [records]}`` by their ``field``."""
    out: dict = {}
    for r in records:
        key = r[field] if isinstance(r, Mapping) else getattr(r, field)
        out.setdefault(key, []).append(r)
    return out
