"""Reward router: routing by domain/fields, overlong penalty, concurrent batch scoring in input order,
a failing scorer masks only its sample, pairwise groups filled from the batch."""
import threading
import time

import pytest

from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, loss_mask, reason_counts
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
    return RewardRouter({name: Recorder(name) for name in ("math", "exact", "verify", "code", "llm", "pairwise")},
                        RouterConfig(workers=4, progress=True))


@pytest.mark.parametrize("kwargs,route", [
    (dict(domain="math", reference="1"), "math"),
    (dict(domain="Code", tests=[{"input": "", "output": ""}]), "code"),
    (dict(domain="stem", reference="x"), "llm"),
    (dict(domain="creative"), "pairwise"),
    (dict(domain="puzzle", reference="a, b"), "exact"),
    (dict(domain="verify", reference="YES"), "verify"),
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


def test_scorer_failure_masks_only_that_sample():
    class Broken(BaseScorer):
        def score(self, sample):
            if sample.response == "bad":
                raise KeyError("boom")
            return RewardResult(1.0, True, "ok")

    r = RewardRouter({"math": Broken()}, RouterConfig(max_length=1, overlong_penalty=0.5, progress=False))
    results = r.score_batch([ScoringSample(response="ok", domain="math"), ScoringSample(response="bad", domain="math")])
    assert results[0].correct and results[0].reward == 0.5  # the overlong penalty applies to a real score ...
    bad = results[1]
    assert (bad.reward, bad.correct, bad.masked, bad.category) == (0.0, False, True, "scoring_error")  # ... not to a mask
    assert "KeyError" in bad.reason and "boom" in bad.reason
    assert loss_mask(results) == [True, False]
    counts = reason_counts(results)
    assert counts["passed"] == 1 and counts["scoring_error"] == 1 and counts["masked"] == 1 and counts["timeout"] == 0


def test_pairwise_samples_get_their_prompts_group_and_batched_scorers_one_call():
    class GroupSize(BaseScorer):
        def score(self, sample):
            return RewardResult(float(len(sample.group or [])), False, "rm")

    class Batched(BaseScorer):
        batched = True

        def __init__(self):
            self.calls = []

        def score_batch(self, samples):
            self.calls.append(len(samples))
            return [RewardResult(1.0, True, "judge") for _ in samples]

    llm = Batched()
    r = RewardRouter({"pairwise": GroupSize(), "llm": llm}, RouterConfig(progress=False))
    samples = [ScoringSample(response=f"r{i}", question="q1" if i < 3 else "q2") for i in range(5)]
    samples += [ScoringSample(response="given", question="q1", group=["given", "other"])]
    samples += [ScoringSample(response=f"v{i}", reference="1", domain="stem") for i in range(3)]
    results = r.score_batch(samples)
    assert [x.reward for x in results[:6]] == [4.0, 4.0, 4.0, 2.0, 2.0, 2.0]  # q1: r0-r2 and "given"
    assert llm.calls == [3] and all(x.correct for x in results[6:])


@pytest.mark.timeout(120)
def test_real_math_verifier_through_router():
    with MathVerifier(timeout_s=5.0) as math:
        r = RewardRouter({"math": math}, RouterConfig(max_length=1000, overlong_penalty=0.5, progress=False))
        results = r.score_batch([ScoringSample(response=r"\boxed{\frac{1}{2}}", reference="0.5", domain="math"),
                                 ScoringSample(response="Answer: 3", reference="4", domain="math"),
                                 ScoringSample(response=r"\boxed{2}" + " " * 2000, reference="2", domain="math")])
    assert [(x.reward, x.correct) for x in results] == [(1.0, True), (0.0, False), (0.5, True)]
