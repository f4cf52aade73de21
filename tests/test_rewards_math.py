"""Math verifier: answer extraction, a table of equivalence cases, timeouts, threads."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from rl.rewards.base import ScoringSample
from rl.rewards.answers import extract_final_answer
from rl.rewards.math_verifier import MathVerifier


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout_s=5.0, workers=2) as v:
        yield v


# (model response, reference, expected correct)
CASES = [
    # LaTeX fractions and equivalent forms
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"\boxed{\tfrac{2}{3}}", r"\frac{2}{3}", True),
    (r"\boxed{\frac12}", "1/2", True),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", True),
    (r"\boxed{-\frac{1}{3}}", "-1/3", True),
    (r"\boxed{\frac{-1}{3}}", r"-\frac{1}{3}", True),
    (r"\boxed{1\frac{1}{2}}", "3/2", True),
    (r"\boxed{0.25}", r"\frac{1}{4}", True),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", True),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
    (r"\boxed{\pi}", r"\pi", True),
    (r"\boxed{2\pi}", "6.283185307", True),
    (r"\boxed{10^{3}}", "1000", False),  # unevaluated: restates the computation (issue 15 item 4)
    (r"\boxed{2^{10}}", "1024", False),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{x=5}", "5", True),
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", True),
    (r"\boxed{(1,2]}", "(1,2]", True),
    (r"\boxed{[0,\infty)}", r"[0,\infty)", True),
    (r"\boxed{50\%}", "0.5", True),
    (r"\boxed{25\%}", r"\frac{1}{4}", True),
    (r"\boxed{3\text{ cm}}", "3", True),
    (r"\boxed{\text{12 apples}}", "12", False),  # text box: math-verify keeps it as text
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{\$5}", "5", True),
    (r"\boxed{\left(\frac{1}{2}\right)}", "1/2", True),
    (r"\boxed{\boxed{7}}", "7", True),  # nested boxes
    (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}", True),
    (r"\boxed{\log_2 8}", "3", False),  # unevaluated
    (r"\boxed{\sin^2 x + \cos^2 x}", "1", False),  # unevaluated
    # extraction: last boxed wins, Answer: lines, a bare number; no "last number anywhere" fallback
    (r"First \boxed{3}, corrected: \boxed{4}", "4", True),
    (r"First \boxed{3}, corrected: \boxed{4}", "3", False),
    ("The sum is 12.\nAnswer: 15", "15", True),
    ("So the final answer is 42.", "42", True),
    ("Answer: $\\frac{5}{6}$", "5/6", True),
    ("Answer: 12 apples", "12", True),
    ("Answer: 7 dollars", "7", True),
    ("We get 3 then 5 then finally 9", "9", False),  # no final answer given
    ("9", "9", True),
    ("  -2.5 \n", "-2.5", True),
    ("We get 3 then 5 then finally 9", "5", False),
    ("the value is 2.50", "2.5", False),
    ("the total is 1,234", "1234", False),
    ("The answer is 2.50", "2.5", True),
    ("The answer is 1,234.", "1234", True),
    ("the answer: -7", "-7", True),
    ("ratio 3/4", "0.75", False),
    ("The answer is 3/4.", "0.75", True),
    # restating the question or hedging is not an answer
    ("The answer is 4821 + 377.", "5198", False),
    ("The answer is 2 -3.", "-1", False),
    ("The answer is 5 or 6.", "5", False),
    ("The answer is 5, 6.", "5", False),
    (r"\boxed{\pm 2}", "2", False),
    ("The answer is [4, 6].", "5", False),
    ("The answer is x.", "5", False),
    ("The answer is x = 5.", "5", True),
    # wrong but close
    (r"\boxed{0.333}", r"\frac{1}{3}", False),
    (r"\boxed{3.14}", r"\pi", False),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}", False),
    (r"\boxed{-5}", "5", False),
    (r"\boxed{(1,2)}", "(1,2]", False),
    (r"\boxed{[1,2)}", "(1,2]", False),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", False),
    (r"\boxed{x^2+1}", "(x+1)^2", False),
    (r"\boxed{1001}", "1000", False),
    (r"\boxed{50}", "0.5", False),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", False),
    ("Answer: 16", "15", False),
    # garbage
    ("I do not know.", "5", False),
    ("", "5", False),
    (r"\boxed{}", "5", False),
    (r"\boxed{\frac{1}{", "1/2", False),
    (r"\boxed{banana}", "5", False),
    ("}}}{{{\\\\boxed", "5", False),
    (r"\boxed{" + "(" * 50 + "1" + ")" * 50 + "}", "2", False),
]


def test_table_has_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.timeout(240)
def test_equivalence_table(verifier):
    samples = [ScoringSample(response=r, reference=ref, domain="math") for r, ref, _ in CASES]
    with ThreadPoolExecutor(4) as pool:  # also proves it works off the main thread
        results = list(pool.map(verifier.score, samples))
    wrong = [(c, res) for c, res in zip(CASES, results) if res.correct != c[2]]
    assert not wrong, "\n".join(f"{c!r} -> {res}" for c, res in wrong)
    for (_, _, expected), res in zip(CASES, results):
        assert res.reward == (1.0 if expected else 0.0)
        assert res.reason


@pytest.mark.parametrize("text,expected", [
    (r"x \boxed{\frac{1}{\{2\}}} y", r"\frac{1}{\{2\}}"),
    (r"\fbox{3}", "3"),
    ("Answer: 4.\nmore text 9", "4"),
    ("no digits here", None),
    ("The answer is 12 apples and oranges" + " apples and oranges" * 5 + " !", "12 apples and oranges" + " apples and oranges" * 5 + " !"),
    ("\\boxed{" * 5000, None),  # many unclosed boxes: one linear pass
    (r"\boxed{unclosed", None),
])
def test_extraction(text, expected):
    assert extract_final_answer(text) == expected


def test_missing_reference_is_a_clear_error(verifier):
    with pytest.raises(ValueError, match="reference"):
        verifier.score(ScoringSample(response=r"\boxed{1}"))


@pytest.mark.timeout(120)
def test_timeout_is_incorrect_and_worker_recovers():
    with MathVerifier(timeout_s=1.0, workers=1) as v:
        v.check("1", "1")  # start the worker before timing anything
        # A power tower sympy cannot finish evaluating in a second of CPU.
        res = v.check(r"\boxed{9^{9^{9^{9^{9}}}}}", "9^{9^{9^{9^{8}}}} + 1")
        assert not res.correct and res.reward == 0.0 and not res.masked
        assert res.category in ("timeout", "wrong_answer"), res
        assert v.check(r"\boxed{\frac{1}{2}}", "0.5").correct  # the worker (or its replacement) took over
