"""Reward router: routing by domain/fields, overlong penalty, concurrent batch scoring in input order."""
import threading
import time

import pytest

from rl.rewards.base import BaseScorer, RewardResult, ScoringSample
from rl.rewards.math_verifier import MathVerifier
from rl.rewards.router import RewardRouter, RouterConfig


class Recorder(BaseScorer):
    """Scores by a function of the response; records threads and sleeps to expose ordering bugs."""

    def __init__(self, name):
        self.name, self.threads, self.lock = name, set(), threading.Lock()

    def score(self, sample):
        with self.lock:
            self.threads.add(threading.get_ident())
        time.sleep(0.02 * (len(sample.response) % 3))  # finish out of order
        return RewardResult(float(len(sample.response)), True, self.name)


@pytest.fixture
def router():
    return RewardRouter({name: Recorder(name) for name in ("math", "code", "llm", "pairwise")},
                        RouterConfig(workers=4, progress=True))


@pytest.mark.parametrize("kwargs,route", [
    (dict(domain="math", reference="1"), "math"),
    (dict(domain="Code", tests=[{"input": "", "output": ""}]), "code"),
    (dict(domain="stem", reference="x"), "llm"),
    (dict(domain="creative"), "pairwise"),
    (dict(tests=[{"assert": "assert True"}]), "code"),
    (dict(reference="5"), "llm"),
    (dict(), "pairwise"),
])
def test_routing(router, kwargs, route):
    assert router.route(ScoringSample(response="r", **kwargs)) == route


def test_reference_without_llm_scorer_goes_to_math():
    r = RewardRouter({"math": Recorder("math")})
    assert r.route(ScoringSample(response="r", reference="5")) == "math"


def test_missing_scorer_is_a_clear_error():
    r = RewardRouter({"math": Recorder("math")}, RouterConfig(progress=False))
    with pytest.raises(ValueError, match="sample 1: .*'pairwise'"):
        r.score_batch([ScoringSample(response="a", reference="1"), ScoringSample(response="b")])
    with pytest.raises(ValueError, match="unknown route"):
        RewardRouter({"maths": Recorder("m")})


def test_batch_is_concurrent_and_ordered(router):
    samples = [ScoringSample(response="x" * n, domain="math", reference="0") for n in range(1, 25)]
    results = router.score_batch(samples)
    assert [r.reward for r in results] == [float(n) for n in range(1, 25)]
    assert all(r.reason == "[math] math" for r in results)
    assert len(router.scorers["math"].threads) > 1


def test_overlong_penalty_hard_and_soft():
    hard = RewardRouter({"math": Recorder("m")}, RouterConfig(max_length=10, overlong_penalty=1.0, progress=False))
    assert hard.overlong_penalty(ScoringSample(response="x" * 10)) == 0.0
    assert hard.overlong_penalty(ScoringSample(response="x" * 11)) == 1.0
    assert hard.overlong_penalty(ScoringSample(response="x", response_tokens=50)) == 1.0  # tokens win over chars
    res = hard.score(ScoringSample(response="x" * 12, domain="math"))
    assert res.reward == 11.0 and "overlong" in res.reason
    soft = RewardRouter({"math": Recorder("m")}, RouterConfig(max_length=10, overlong_penalty=1.0, overlong_buffer=4))
    assert [soft.overlong_penalty(ScoringSample(response="", response_tokens=n)) for n in (6, 8, 10, 12)] == \
        [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="overlong_buffer"):
        RouterConfig(max_length=4, overlong_buffer=4).validate()


def test_scorer_failure_names_the_sample():
    class Broken(BaseScorer):
        def score(self, sample):
            raise KeyError("boom")

    r = RewardRouter({"math": Broken()}, RouterConfig(progress=False))
    with pytest.raises(RuntimeError, match="sample 0 .*boom"):
        r.score_batch([ScoringSample(response="a", domain="math")])


@pytest.mark.timeout(120)
def test_real_math_verifier_through_router():
    with MathVerifier(timeout_s=5.0) as math:
        r = RewardRouter({"math": math}, RouterConfig(max_length=1000, overlong_penalty=0.5, progress=False))
        results = r.score_batch([ScoringSample(response=r"\boxed{\frac{1}{2}}", reference="0.5", domain="math"),
                                 ScoringSample(response="Answer: 3", reference="4", domain="math"),
                                 ScoringSample(response=r"\boxed{2}" + " " * 2000, reference="2", domain="math")])
    assert [(x.reward, x.correct) for x in results] == [(1.0, True), (0.0, False), (0.5, True)]
