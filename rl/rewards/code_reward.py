"""Code reward: run the candidate program against unit tests in the :mod:`sandbox`.

Test cases (``ScoringSample.tests``), each a dict:

* ``{"input": "...", "output": "..."}``: feed ``input`` on stdin, compare stdout with
  ``output`` token by token (whitespace-insensitive; numbers within ``float_tol``
  relative/absolute when configured), or ask the checker.
* ``{"assert": "assert add(1, 2) == 3"}``: a function-call test. The sandbox's driver
  imports the program as a module and runs the statements itself; the case passes only
  when the driver saw them run to completion (its nonce-keyed record), never on an
  exit status (see :mod:`rl.rewards.sandbox_harness`).

Checker (``ScoringSample.checker``, the :mod:`data.checkers` contract): Python source
defining ``check(output, expected[, input]) -> bool``, run in the sandbox after the
candidate has ended; only ``True`` accepts. Use it for special judges: several valid
answers, custom float tolerance, output validated by rules.

Reward = fraction of cases passed (``mode="fraction"``) or 1/0 for all/any failing
(``mode="all"``); ``correct`` means every case passed. A failed case is never a pass.
The category of a failed sample is its worst case's: ``sandbox_error`` (the whole
sample is masked: the sandbox, not the program, failed), then ``hack_suspect``,
``timeout``, ``crash``, ``wrong_answer``.
"""
from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, require_field
from rl.rewards.sandbox import Case, RunResult, Sandbox, SandboxLimits

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The last fenced code block (```python / ```py / ```), else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def _close(a: str, b: str, tol: float) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if math.isnan(x) or math.isnan(y):
        return False
    return abs(x - y) <= tol * max(1.0, abs(y))


def outputs_match(got: str, expected: str, float_tol: Optional[float] = None) -> bool:
    """Token-wise equality of two outputs; numeric tokens may differ by ``float_tol`` (relative above 1)."""
    a, b = got.split(), expected.split()
    if len(a) != len(b):
        return False
    return all(x == y or (float_tol is not None and _close(x, y, float_tol)) for x, y in zip(a, b))


@dataclass
class CodeRewardConfig:
    mode: str = "fraction"  # fraction | all
    float_tol: Optional[float] = None  # tolerance for numeric tokens when no checker is given
    workers: int = 2  # sandbox runs in parallel
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    isolation: str = "auto"  # auto | bubblewrap | rlimits-only

    def validate(self) -> None:
        if self.mode not in ("fraction", "all"):
            raise ValueError(f"CodeRewardConfig.mode must be 'fraction' or 'all', got {self.mode!r}")
        if self.float_tol is not None and self.float_tol < 0:
            raise ValueError(f"CodeRewardConfig.float_tol must be >= 0 or None, got {self.float_tol}")


class CodeReward(BaseScorer):
    """Scores code responses by running their unit tests in a :class:`Sandbox`."""

    def __init__(self, config: Optional[CodeRewardConfig] = None, sandbox: Optional[Sandbox] = None) -> None:
        self.config = config or CodeRewardConfig()
        self.config.validate()
        self.sandbox = sandbox or Sandbox(self.config.limits, self.config.workers, self.config.isolation)

    def score(self, sample: ScoringSample) -> RewardResult:
        tests = require_field(sample, "tests", "CodeReward")
        if not tests:
            raise ValueError("CodeReward: sample has an empty 'tests' list; give at least one test case")
        cases = [self._case(case, i) for i, case in enumerate(tests)]
        runs = self._run_cases(extract_code(sample.response), cases, sample.checker)
        verdicts = [self._judge(case, run, sample.checker) for case, run in zip(tests, runs)]
        passed = sum(category == "passed" for category, _ in verdicts)
        total = len(tests)
        failures = [(i, c, why) for i, (c, why) in enumerate(verdicts) if c != "passed"]
        reason = f"{passed}/{total} tests passed"
        if not failures:
            return RewardResult(1.0, True, reason)
        worst = min(failures, key=lambda f: _SEVERITY.index(f[1]))
        reason += f"; first failure: test {failures[0][0]}: {failures[0][2]}"
        if worst[1] != failures[0][1]:
            reason += f"; worst: test {worst[0]}: {worst[2]}"
        if worst[1] == "sandbox_error":
            return RewardResult.failed("sandbox_error", reason)
        reward = 0.0 if self.config.mode == "all" else passed / total
        return RewardResult(reward, False, reason, worst[1])

    def _run_cases(self, program: str, cases: list, checker: Optional[str]) -> list:
        """All cases of one program, split over up to ``workers`` sandboxes running at once."""
        n_chunks = min(self.config.workers, len(cases))
        size = -(-len(cases) // n_chunks)
        chunks = [cases[i:i + size] for i in range(0, len(cases), size)]
        if len(chunks) == 1:
            return self.sandbox.run_cases(program, chunks[0], checker)
        with ThreadPoolExecutor(len(chunks)) as pool:
            return [run for runs in pool.map(lambda c: self.sandbox.run_cases(program, c, checker), chunks) for run in runs]

    @staticmethod
    def _case(case: dict, index: int) -> Case:
        if "assert" in case:
            return Case(case.get("input", ""), test=case["assert"])
        if "output" in case:
            return Case(case.get("input", ""), expected=case["output"])
        raise ValueError(f"CodeReward: test {index} has neither 'output' (stdin/stdout case) nor 'assert' "
                         f"(function-call case); keys given: {sorted(case)}")

    def _judge(self, case: dict, run: RunResult, checker: Optional[str]) -> tuple[str, str]:
        """(category, why) of one case: ``passed`` or the failure's category (see :data:`_SEVERITY`)."""
        if run.status == "ok":
            if "assert" in case:
                return "passed", "ok"
            if checker is not None:
                if run.checker == "accept":
                    return "passed", "ok"
                return "wrong_answer", f"rejected by checker ({run.checker})"
            if outputs_match(run.stdout, case["output"], self.config.float_tol):
                return "passed", "ok"
            return "wrong_answer", f"wrong answer: got {run.stdout.strip()[:60]!r}, expected {case['output'].strip()[:60]!r}"
        category = {"test_failed": "wrong_answer", "timeout": "timeout", "hack_suspect": "hack_suspect",
                    "sandbox_error": "sandbox_error"}.get(run.status, "crash")
        if run.status == "runtime_error" and run.detail == "CPU time limit":
            category = "timeout"
        return category, run.describe()


_SEVERITY = ("sandbox_error", "hack_suspect", "timeout", "crash", "wrong_answer")
