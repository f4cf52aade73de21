"""The checker contract of code tasks, and the test that a task cannot be passed by a wrong program.

A *checker* is Python source that defines ``check(output, expected)`` or
``check(output, expected, input)`` (``input`` is the test's stdin) and returns ``True``
to accept the program's output for a test; anything else (``False``, ``None``, ``1``,
an exception) rejects it. The code reward (:mod:`rl.rewards.code_reward`) runs it in
the sandbox once the candidate program has ended; without a checker a test's output
must equal ``expected`` token by token.

A task is *degenerate* when a wrong program passes all of its tests. The wrong programs
tried (:func:`degenerate_outputs`): printing nothing, echoing the input, printing the
expected output of another test. :func:`degenerate_problem` applies them to a checker
given as a Python function; the code scorer applies the same programs through the real
sandbox to tasks loaded from files (:func:`rl.rewards.factory.admit_prompts`). Every
expected output must also be accepted by the checker, or no program can pass.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

CHECK_NAME = "check"


def expects(output: str, expected: str) -> bool:
    """The comparison without a checker: equal whitespace-separated tokens."""
    return output.split() == expected.split()


def degenerate_outputs(tests: Sequence[dict]) -> dict:
    """``{name: [output per test]}`` of the wrong programs every task must fail (stdin/stdout tests)."""
    n = len(tests)
    return {
        "empty program": ["" for _ in tests],
        "input echoed back": [t.get("input", "") for t in tests],
        "another test's expected output": [tests[(i + 1) % n]["output"] for i in range(n)],
    }


def degenerate_problem(tests: Sequence[dict], accepts: Callable[[str, str, str], bool]) -> Optional[str]:
    """Why these stdin/stdout tests are degenerate under ``accepts(output, expected, input)``, or None.

    Degenerate: some expected output is rejected (no program can pass), every one of
    two or more tests expects the same output (a constant program passes), or a wrong
    program of :func:`degenerate_outputs` is accepted on every test while its output
    differs from the expected one on at least one.
    """
    if not tests:
        return "no tests"
    if len(tests) > 1 and all(expects(t["output"], tests[0]["output"]) for t in tests):
        return "every test expects the same output: a constant program passes"
    for i, t in enumerate(tests):
        if not accepts(t["output"], t["output"], t.get("input", "")):
            return f"the checker rejects the expected output of test {i}"
    for name, outputs in degenerate_outputs(tests).items():
        wrong = any(not expects(o, t["output"]) for o, t in zip(outputs, tests))
        if wrong and all(accepts(o, t["output"], t.get("input", "")) for o, t in zip(outputs, tests)):
            return f"a wrong program ({name}) passes every test"
    return None


def checker_function(source: str) -> Callable[[str, str, str], bool]:
    """``accepts(output, expected, input)`` of trusted checker source run in this process (generated tasks only)."""
    namespace: dict = {}
    exec(compile(source, "<checker>", "exec"), namespace)
    check = namespace.get(CHECK_NAME)
    if not callable(check):
        raise ValueError(f"checker source defines no {CHECK_NAME}(output, expected[, input]) function")
    takes_input = check.__code__.co_argcount >= 3

    def accepts(output: str, expected: str, stdin: str) -> bool:
        try:
            return (check(output, expected, stdin) if takes_input else check(output, expected)) is True
        except Exception:
            return False

    return accepts
