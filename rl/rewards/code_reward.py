"""Code reward: run the candidate program against unit tests in the :mod:`sandbox`.

Test cases (``ScoringSample.tests``), each a dict:

* ``{"input": "...", "output": "..."}``: feed ``input`` on stdin, compare stdout with
  ``output`` token by token (whitespace-insensitive; numbers within ``float_tol``
  relative/absolute when configured), or ask the checker script.
* ``{"assert": "assert add(1, 2) == 3"}``: append the code to the program; the case
  passes iff the program then exits 0 (function-call tests).

Checker script (``ScoringSample.checker``, Python source): run in the sandbox with
``input.txt``, ``expected.txt`` and ``output.txt`` in its working directory; exit
status 0 accepts the candidate's output, anything else rejects it. Use it for special
judges: several valid answers, custom float tolerance, output validated by rules.

Reward = fraction of cases passed (``mode="fraction"``) or 1/0 for all/any failing
(``mode="all"``); ``correct`` means every case passed. A sandbox failure of any kind
(timeout, crash, output limit, sandbox error) fails the case: it is never a pass.
"""
from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, require_field
from rl.rewards.sandbox import RunResult, Sandbox, SandboxLimits

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
        program = extract_code(sample.response)
        runs = self._run_cases(program, [self._case(case, i) for i, case in enumerate(tests)])
        verdicts = [self._judge(case, run, sample.checker) for case, run in zip(tests, runs)]
        if sample.checker is not None:
            verdicts = self._run_checkers(tests, runs, verdicts, sample.checker)
        passed = sum(ok for ok, _ in verdicts)
        total = len(tests)
        failures = [f"test {i}: {why}" for i, (ok, why) in enumerate(verdicts) if not ok]
        reason = f"{passed}/{total} tests passed" + (f"; first failure: {failures[0]}" if failures else "")
        if self.config.mode == "all":
            reward = 1.0 if passed == total else 0.0
        else:
            reward = passed / total
        return RewardResult(reward, passed == total, reason)

    def _run_cases(self, program: str, cases: list) -> list:
        """All cases of one program, split over up to ``workers`` sandboxes running at once."""
        n_chunks = min(self.config.workers, len(cases))
        size = -(-len(cases) // n_chunks)
        chunks = [cases[i:i + size] for i in range(0, len(cases), size)]
        if len(chunks) == 1:
            return self.sandbox.run_cases(program, chunks[0])
        with ThreadPoolExecutor(len(chunks)) as pool:
            return [run for runs in pool.map(lambda c: self.sandbox.run_cases(program, c), chunks) for run in runs]

    @staticmethod
    def _case(case: dict, index: int) -> tuple:
        """(stdin, code appended to the program) for one test case."""
        if "assert" in case:
            return (case.get("input", ""), "\n\n" + case["assert"] + "\n")
        if "output" in case:
            return (case.get("input", ""), "")
        raise ValueError(f"CodeReward: test {index} has neither 'output' (stdin/stdout case) nor 'assert' "
                         f"(function-call case); keys given: {sorted(case)}")

    def _judge(self, case: dict, run: RunResult, checker: Optional[str]) -> tuple[bool, str]:
        """(passed, why) from the candidate's run alone; stdin/stdout cases with a checker are decided later."""
        if not run.ok:
            return False, run.describe()
        if "assert" in case:
            return True, "ok"
        if checker is not None:
            return False, "pending checker"
        if outputs_match(run.stdout, case["output"], self.config.float_tol):
            return True, "ok"
        return False, f"wrong answer: got {run.stdout.strip()[:60]!r}, expected {case['output'].strip()[:60]!r}"

    def _run_checkers(self, tests: list, runs: list, verdicts: list, checker: str) -> list:
        pending = [i for i, (case, run) in enumerate(zip(tests, runs)) if run.ok and "assert" not in case]
        jobs = [(checker, "", {"input.txt": tests[i].get("input", ""), "expected.txt": tests[i]["output"],
                               "output.txt": runs[i].stdout}) for i in pending]
        verdicts = list(verdicts)
        for i, check in zip(pending, self.sandbox.run_many(jobs)):
            if check.ok:
                verdicts[i] = (True, "ok")
            elif check.status == "runtime_error" and check.detail.startswith("exit code"):
                verdicts[i] = (False, f"rejected by checker ({check.detail})")
            else:
                verdicts[i] = (False, f"checker failed: {check.describe()}")
        return verdicts
