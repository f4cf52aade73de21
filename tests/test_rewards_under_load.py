"""A correct answer never scores 0 because the machine is busy: checks run while every core is saturated.

The math verifier's budget is CPU time of a worker that is already up (a replacement
starts in the background after a timeout), and a sandboxed case's wall clock is renewed
while the program is runnable but starved, so only genuinely slow or stuck answers fail.
"""
import os
import subprocess
import sys

import pytest

from rl.rewards.base import ScoringSample
from rl.rewards.code_reward import CodeReward, CodeRewardConfig
from rl.rewards.math_verifier import MathVerifier
from rl.rewards.sandbox import SandboxLimits


@pytest.fixture
def saturated():
    """Three busy-looping processes per core for the duration of the test."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True:\n    pass"]) for _ in range(3 * (os.cpu_count() or 1))]
    try:
        yield len(hogs)
    finally:
        for p in hogs:
            p.kill()
        for p in hogs:
            p.wait()


MATH = [
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{(1,2]}", "(1,2]"),
    ("The answer is 5198.", "5198"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}"),
]


@pytest.mark.timeout(600)
def test_math_checks_on_a_saturated_machine_have_no_false_negative(saturated):
    with MathVerifier(timeout_s=1.0, workers=1) as verifier:  # started under load: start-up is not timed
        first = [verifier.check(response, reference) for response, reference in MATH]
        slow = verifier.check(r"\boxed{9^{9^{9^{9^{9}}}}}", "9^{9^{9^{9^{8}}}} + 1")  # uses up its CPU second
        after = [verifier.check(response, reference) for response, reference in MATH]  # a replacement worker
    assert all(r.correct for r in first + after), [r for r in first + after if not r.correct]
    assert not slow.correct and slow.category in ("timeout", "wrong_answer")


@pytest.mark.timeout(600)
def test_sandbox_cases_on_a_saturated_machine_have_no_false_negative(saturated):
    limits = SandboxLimits(cpu_s=2, wall_s=1.0, memory_mb=256)
    reward = CodeReward(CodeRewardConfig(mode="all", workers=2, limits=limits))
    # About a quarter of a CPU second per case: with 3 busy processes per core it needs more than 1 s of wall time.
    program = "n = int(input())\ns = 0\nfor i in range(3_000_000):\n    s += i % 7\nprint(n * 2 + s - s)"
    tests = [{"input": f"{i}\n", "output": f"{2 * i}\n"} for i in range(4)]
    results = [reward.score(ScoringSample(response=program, tests=tests, domain="code")) for _ in range(3)]
    assert all(r.correct for r in results), [r.reason for r in results]
    sleeper = reward.score(ScoringSample(response="import time\ntime.sleep(30)", tests=tests[:1], domain="code"))
    assert not sleeper.correct and sleeper.category == "timeout"  # not runnable: the wall clock still applies
    # One CPU second fits the wall cap (wall_s x (1 + WALL_EXTENSIONS)) at a twentieth of a core, so the CPU
    # limit decides even when the hogs share the cores with another test worker (CI saw 2 CPU-s not fit 11 s).
    spin_limits = SandboxLimits(cpu_s=1, wall_s=2.0, memory_mb=256)
    spin_reward = CodeReward(CodeRewardConfig(mode="all", workers=1, limits=spin_limits))
    spinner = spin_reward.score(ScoringSample(response="while True:\n    pass", tests=tests[:1], domain="code"))
    assert not spinner.correct and spinner.category == "timeout" and "CPU time limit" in spinner.reason
