"""Online data distribution adaptation: signals, bounded weights that follow them, exact resume."""
from __future__ import annotations

import dataclasses
import io
import random

import pytest
import torch

from megatron_seed.config import ConfigError, RLConfig
from rl.adaptation import DomainSampler, domain_signals, project_to_bounds, split_by_domain

CFG = RLConfig(adaptation_rule="learnability", adaptation_min_weight=0.1, adaptation_max_weight=0.6,
               adaptation_rate=0.5, adaptation_ema=0.5)


class Stream:
    """A re-iterable prompt source (like a JSONL file reader): every iter() starts over."""

    def __init__(self, n, prefix):
        self.n, self.prefix = n, prefix

    def __iter__(self):
        return (f"{self.prefix}{i}" for i in range(self.n))


def sources():
    return {
        "math": [f"m{i}" for i in range(7)],
        "code": [f"c{i}" for i in range(5)],
        "general": Stream(4, "g"),
    }


def solved_half():  # p = 1/2 in every group: maximal learnability
    return [[1, 0, 1, 0], [0, 1, 1, 0]]


def always_solved():  # p = 1: nothing left to learn
    return [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_domain_signals():
    s = domain_signals([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert s["reward_mean"] == pytest.approx(7 / 12)
    assert s["zero_var_frac"] == pytest.approx(1 / 3)
    assert s["learnability"] == pytest.approx((0.25 + 0.0 + 0.75 * 0.25) / 3)
    assert s["reward_var"] == pytest.approx((0.25 + 0.0 + 0.1875) / 3)
    # pass rates come from the correctness flags when given, not from the reward scale
    s = domain_signals([[0.9, 0.8], [0.2, 0.1]], correct_GK=[[True, False], [False, False]])
    assert s["learnability"] == pytest.approx((0.25 + 0.0) / 2)


def test_projection_bounds_are_exact():
    rng = random.Random(0)
    for n in (2, 3, 5, 8):
        lo, hi = 0.5 / n, min(1.0, 2.5 / n)
        for _ in range(50):
            v = [rng.random() * rng.choice([0.01, 1, 10]) for _ in range(n)]
            w = project_to_bounds(v, lo, hi)
            assert all(lo <= x <= hi for x in w)
            assert sum(w) == pytest.approx(1.0, abs=1e-12)
            # Euclidean projection: every weight strictly inside the bounds moved by the same shift
            shifts = [x - y for x, y in zip(w, v) if lo < x < hi]
            assert max(shifts, default=0) - min(shifts, default=0) < 1e-9
    with pytest.raises(ConfigError, match="adaptation_max_weight"):
        project_to_bounds([0.5, 0.5], 0.0, 0.4)


def test_learnability_shifts_weight_toward_then_away():
    sampler = DomainSampler(sources(), CFG, seed=1)
    assert list(sampler.weights.values()) == pytest.approx([1 / 3] * 3)
    history = []
    for _ in range(8):  # math is learnable, the others are always solved
        sampler.update({"math": solved_half(), "code": always_solved(), "general": always_solved()})
        history.append(dict(sampler.weights))
    assert history[-1]["math"] == pytest.approx(0.6)  # pinned at the max bound
    assert history[0]["math"] > 1 / 3 and all(a["math"] <= b["math"] for a, b in zip(history, history[1:]))
    assert history[-1]["code"] == pytest.approx(0.2) and history[-1]["general"] == pytest.approx(0.2)
    for _ in range(8):  # math gets solved, code becomes the learnable one
        sampler.update({"math": always_solved(), "code": solved_half(), "general": always_solved()})
        history.append(dict(sampler.weights))
    assert history[-1]["code"] == pytest.approx(0.6) and history[-1]["math"] < 0.25
    for w in history:
        assert all(0.1 <= x <= 0.6 for x in w.values())
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    m = sampler.metrics()
    assert m["adapt/weight/code"] == history[-1]["code"]
    assert m["adapt/learnability/code"] > m["adapt/learnability/math"]


def test_reward_rule_favours_headroom_and_unobserved_domains_are_explored():
    cfg = dataclasses.replace(CFG, adaptation_rule="reward")
    sampler = DomainSampler(sources(), cfg, seed=2)
    for _ in range(6):
        sampler.update({"math": [[0.1, 0.0, 0.2, 0.1]], "code": [[0.9, 1.0, 0.8, 1.0]]})
    w = sampler.weights
    assert w["math"] > w["code"]
    assert w["general"] >= w["math"] - 1e-12  # never observed: scored like the best observed domain
    uniform = DomainSampler(sources(), dataclasses.replace(CFG, adaptation_rule="uniform"), seed=2,
                            initial_weights={"math": 0.6, "code": 0.3, "general": 0.1})
    for _ in range(30):
        uniform.update({"math": solved_half()})
    assert list(uniform.weights.values()) == pytest.approx([1 / 3] * 3, abs=1e-6)


def test_draws_follow_weights_and_streams_cycle():
    sampler = DomainSampler(sources(), CFG, seed=3, initial_weights={"math": 0.6, "code": 0.3, "general": 0.1})
    draws = sampler.sample(3000)
    counts = {d: sum(p.domain == d for p in draws) for d in sampler.domains}
    for d, w in sampler.weights.items():
        assert counts[d] / 3000 == pytest.approx(w, abs=0.04)
    math_records = [p.record for p in draws if p.domain == "math"]
    assert sorted(math_records[:7]) == sorted(sources()["math"])  # an epoch is a permutation
    assert math_records[:7] != math_records[7:14]  # reshuffled per epoch
    general = [p.record for p in draws if p.domain == "general"]
    assert general[:8] == ["g0", "g1", "g2", "g3"] * 2  # a stream is read in order and restarted


def test_resume_gives_same_weights_and_draws():
    a = DomainSampler(sources(), CFG, seed=4)
    rng = random.Random(0)

    def step(s):
        drawn = s.sample(5)
        rewards = {}
        for p in drawn:
            rewards.setdefault(p.domain, []).append([rng.random() > 0.5 for _ in range(4)])
        s.update({d: [[float(x) for x in g] for g in gs] for d, gs in rewards.items()})
        return [(p.domain, p.record) for p in drawn]

    for _ in range(6):
        step(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = DomainSampler(sources(), CFG, seed=999)  # a different seed: the checkpoint's wins
    b.load_state_dict(torch.load(buf))
    assert b.weights == a.weights and b.metrics() == a.metrics()
    rng_state = rng.getstate()
    draws_a = [step(a) for _ in range(6)]
    rng.setstate(rng_state)
    draws_b = [step(b) for _ in range(6)]
    assert draws_a == draws_b
    assert b.weights == a.weights


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="adaptation_rule"):
        DomainSampler(sources(), dataclasses.replace(CFG, adaptation_rule="greedy"))
    with pytest.raises(ConfigError, match="adaptation_max_weight"):
        DomainSampler({"math": ["m"]}, CFG)  # one domain cannot stay below max 0.6
    with pytest.raises(ValueError, match="unknown domains"):
        DomainSampler(sources(), CFG).update({"poetry": [[1, 0]]})
    one_shot = DomainSampler({"a": iter(["x", "y"]), "b": ["z"]}, CFG, initial_weights={"a": 1.0})
    with pytest.raises(ValueError, match="cannot restart"):
        one_shot.sample(50)
    other = DomainSampler({"x": ["1"], "y": ["2"]}, CFG)
    with pytest.raises(ValueError, match="same domains"):
        other.load_state_dict(DomainSampler(sources(), CFG).state_dict())


def test_split_by_domain():
    recs = [{"domain": "math", "id": 1}, {"domain": "code", "id": 2}, {"domain": "math", "id": 3}]
    assert {d: [r["id"] for r in rs] for d, rs in split_by_domain(recs).items()} == {"math": [1, 3], "code": [2]}
