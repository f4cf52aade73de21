"""Procedural verifiable tasks: problems with reference answers, unit tests and worked solutions.

Six families, each a function ``(rng, difficulty) -> Problem`` with ``difficulty`` in
1..5 (the knob: more digits and operands, larger coefficients, longer lists, harder
programs with bigger test inputs):

- ``arithmetic`` (math): chains of + and - of multi-digit numbers, or a long
  multiplication, worked step by step.
- ``addition`` (math): ``a + b`` of a (d+1)-digit and a d-digit number, one worked line.
- ``largest`` (math): the largest of 2 + d two-digit numbers.
- ``linear_equation`` (math): ``a*x + b = c`` or ``a*x + b = d*x + e`` with an integer root.
- ``string_task`` (puzzle): sort words or numbers, count a letter, reverse a word.
- ``program`` (code): a small stdin/stdout program (sum, max, reverse, fizzbuzz, ...)
  with hidden unit tests computed by a reference implementation (the example in the
  prompt is not one of them), a checker where plain token comparison is not the rule
  (:mod:`data.checkers` contract) and the reference program as the worked solution.
  Every generated program task is refused unless wrong programs (empty, echo, another
  test's output) fail it (:func:`data.checkers.degenerate_problem`).
- ``verify`` (verify): the Seed-Thinking-Verifier task. The verifier prompt of
  :mod:`data.verifier_prompt` for a question, its reference answer and a candidate
  answer that is either equivalent but written differently (``1/2`` for ``0.5``,
  ``10/2`` for ``5``, ``x = 5``) or a near miss (off by one, sign, a factor of ten, the
  question's unevaluated expression, a hedge); the label YES / NO is the reference and
  the rule scorer :class:`rl.rewards.verdict.VerdictScorer` reads the keyed verdict line.

:func:`generate_prompts` turns them into RL prompt records (:mod:`data.prompts`
schema); :func:`generate_sft` into chat conversations whose assistant turn is the
worked solution (or, with ``worked=False``, only its final step, "The answer is <answer>."). Both are
reproducible from ``seed``: the same arguments always give the same records.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional, Sequence

from data.checkers import checker_function, degenerate_problem, expects
from data.prompts import PromptRecord
from data.verifier_prompt import build_verifier_prompt

SYSTEM_PROMPT = "You are a careful assistant. Think step by step and end with the final answer."

CASELESS_CHECKER = "def check(output, expected):\n    return output.strip().lower() == expected.strip().lower()\n"


@dataclass
class Problem:
    """One generated task: ``answer`` for math/puzzles, ``unit_tests`` + ``checker`` for code."""

    kind: str
    domain: str
    prompt: str
    solution: str  # worked solution; for math and puzzles it ends with "The answer is <answer>."
    answer: Optional[str] = None
    unit_tests: list = field(default_factory=list)
    checker: Optional[str] = None
    difficulty: int = 1
    metadata: dict = field(default_factory=dict)  # extra record metadata (verify: the verdict key)

    def final_step(self) -> str:
        """The solution without its working: "The answer is <answer>.", a verifier task's verdict line; a program's
        code whole (it has no shorter form)."""
        if self.answer is None:
            return self.solution
        return self.solution.rsplit("\n", 1)[-1] if self.kind == "verify" else f"The answer is {self.answer}."


def _check_difficulty(difficulty: int) -> None:
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty={difficulty}: must be an integer in 1..5 (1 easiest)")


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


# ----------------------------------------------------------------------------- math


def arithmetic(rng: random.Random, difficulty: int) -> Problem:
    """``difficulty`` d: d+1-digit operands; d >= 3 adds a third operand; multiplication has d-digit factors."""
    _check_difficulty(difficulty)
    if rng.random() < 0.3:
        a, b = _number(rng, difficulty + 1), _number(rng, max(1, difficulty))
        # Long multiplication by place value: a * b = sum over the digits of b of a * (digit * 10^k).
        parts = [int(ch) * 10**k for k, ch in enumerate(reversed(str(b))) if ch != "0"][::-1] or [0]
        steps = [f"Split {b} by place value: {' + '.join(map(str, parts))}."] if len(parts) > 1 else []
        steps += [f"{a} * {p} = {a * p}." for p in parts]
        if len(parts) > 1:
            steps.append(f"{' + '.join(str(a * p) for p in parts)} = {a * b}.")
        expr, result = f"{a} * {b}", a * b
    else:
        count = 2 + (difficulty >= 3) + (difficulty >= 5)
        values = [_number(rng, difficulty + 1) for _ in range(count)]
        ops = [rng.choice("+-") for _ in range(count - 1)]
        expr = str(values[0])
        result = values[0]
        steps = []
        for op, v in zip(ops, values[1:]):
            new = result + v if op == "+" else result - v
            steps.append(f"{result} {op} {v} = {new}.")
            expr += f" {op} {v}"
            result = new
    phrasing = rng.choice(["What is {e}?", "Compute {e}.", "Calculate {e}.", "Evaluate {e}."])
    solution = " ".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps)) + f" The answer is {result}."
    return Problem("arithmetic", "math", phrasing.format(e=expr), solution, str(result), difficulty=difficulty)


def addition(rng: random.Random, difficulty: int) -> Problem:
    """``a + b`` with a (d+1)-digit ``a`` and a d-digit ``b`` (d = ``difficulty``; 1 digit: 1..9), one
    worked line: the easiest math family, which the tiny RL job learns from a partly right start."""
    _check_difficulty(difficulty)
    a = rng.randint(10**difficulty, 10 ** (difficulty + 1) - 1)
    b = rng.randint(10 ** (difficulty - 1), 10**difficulty - 1)
    solution = f"{a} + {b} = {a + b}. The answer is {a + b}."
    return Problem("addition", "math", f"What is {a} + {b}?", solution, str(a + b), difficulty=difficulty)


def largest(rng: random.Random, difficulty: int) -> Problem:
    """The largest of ``2 + d`` distinct 2-digit numbers, worked by comparing it with each other one."""
    _check_difficulty(difficulty)
    values = rng.sample(range(10, 100), 2 + difficulty)
    best = max(values)
    listed = ", ".join(map(str, values))
    solution = " ".join(f"{best} > {v}." for v in values if v != best) + f" The answer is {best}."
    return Problem("largest", "math", f"Which number is the largest: {listed}?", solution, str(best), difficulty=difficulty)


def _signed(v: int) -> str:
    return f"+ {v}" if v >= 0 else f"- {-v}"


def linear_equation(rng: random.Random, difficulty: int) -> Problem:
    """Integer root; coefficients grow as 3 * difficulty; d >= 3 puts x on both sides."""
    _check_difficulty(difficulty)
    span = 3 * difficulty
    x = rng.randint(-span, span)
    a = rng.choice([v for v in range(-span, span + 1) if v not in (0,)])
    b = rng.randint(-4 * span, 4 * span)
    var = rng.choice("xyzn")
    if difficulty >= 3:
        d = rng.choice([v for v in range(-span, span + 1) if v not in (0, a)])
        e = (a - d) * x + b
        equation = f"{a}{var} {_signed(b)} = {d}{var} {_signed(e)}"
        steps = [
            f"Move {d}{var} to the left: {a - d}{var} {_signed(b)} = {e}.",
            f"Move {b} to the right: {a - d}{var} = {e - b}.",
            f"Divide by {a - d}: {var} = {x}.",
        ]
    else:
        c = a * x + b
        equation = f"{a}{var} {_signed(b)} = {c}"
        steps = [f"Subtract {b} from both sides: {a}{var} = {c - b}.", f"Divide by {a}: {var} = {x}."]
    prompt = rng.choice(["Solve for {v}: {q}.", "Find {v} if {q}.", "What value of {v} satisfies {q}?"])
    solution = " ".join(steps) + f" The answer is {x}."
    return Problem("linear_equation", "math", prompt.format(v=var, q=equation), solution, str(x), difficulty=difficulty)


# ----------------------------------------------------------------------------- strings

WORDS = (
    "apple river stone cloud maple tiger lemon piano rocket garden silver candle forest ocean "
    "window marble pepper violet harbor meadow falcon copper summer winter thunder pebble orbit "
    "lantern cactus walnut breeze shadow canyon island puzzle saddle ribbon glacier mirror"
).split()


def string_task(rng: random.Random, difficulty: int) -> Problem:
    """Sort words/numbers (list length 2 + 2d), count a letter, or reverse a word."""
    _check_difficulty(difficulty)
    n = 2 + 2 * difficulty
    choice = rng.randrange(4)
    if choice == 0:
        words = rng.sample(WORDS, n)
        answer = ", ".join(sorted(words))
        prompt = f"Sort these words alphabetically: {', '.join(words)}."
        solution = f"Ordering by first letters, then later letters: {answer}. The answer is {answer}."
        kind = "sort_words"
    elif choice == 1:
        nums = [rng.randint(0, 10 ** (1 + difficulty // 2)) for _ in range(n)]
        answer = ", ".join(map(str, sorted(nums)))
        prompt = f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}."
        solution = f"The smallest is {min(nums)} and the largest is {max(nums)}. The answer is {answer}."
        kind = "sort_numbers"
    elif choice == 2:
        word = "".join(rng.choice(WORDS) for _ in range(1 + difficulty // 2))
        letter = rng.choice(word)
        positions = [i + 1 for i, ch in enumerate(word) if ch == letter]
        answer = str(len(positions))
        prompt = f"How many times does the letter '{letter}' appear in '{word}'?"
        solution = f"'{letter}' appears at positions {', '.join(map(str, positions))}. The answer is {answer}."
        kind = "count_letter"
    else:
        word = "".join(rng.choice(WORDS) for _ in range(1 + difficulty // 3))
        answer = word[::-1]
        prompt = f"Write '{word}' backwards."
        solution = f"Reading the {len(word)} letters from the end: {answer}. The answer is {answer}."
        kind = "reverse_word"
    return Problem(kind, "puzzle", prompt, solution, answer, difficulty=difficulty)


# ----------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class _ProgramFamily:
    name: str
    min_difficulty: int
    statement: str
    make_input: Callable[[random.Random, int], str]  # (rng, size) -> stdin
    reference: Callable[[str], str]  # stdin -> expected stdout
    source: str  # the reference program, shown as the worked solution
    checker: Optional[str] = None  # None: token-by-token comparison with the expected output


def _ints_line(rng: random.Random, size: int) -> str:
    return " ".join(str(rng.randint(-10 * size, 10 * size)) for _ in range(rng.randint(1, size + 1))) + "\n"


def _text_line(rng: random.Random, size: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, size))) + "\n"


def _palindrome_input(rng: random.Random, size: int) -> str:
    word = "".join(rng.choice("abc") for _ in range(rng.randint(1, size + 1)))
    return (word + word[::-1][rng.randint(0, 1):] if rng.random() < 0.5 else word) + "\n"


def _fizzbuzz(stdin: str) -> str:
    out = []
    for i in range(1, int(stdin) + 1):
        out.append("FizzBuzz" if i % 15 == 0 else "Fizz" if i % 3 == 0 else "Buzz" if i % 5 == 0 else str(i))
    return "\n".join(out) + "\n"


def _second_largest(stdin: str) -> str:
    values = sorted(set(map(int, stdin.split())))
    return (str(values[-2]) if len(values) > 1 else "NONE") + "\n"


PROGRAMS = (
    _ProgramFamily(
        "sum_list", 1, "Read a line of integers separated by spaces and print their sum.",
        _ints_line, lambda s: f"{sum(map(int, s.split()))}\n",
        "nums = list(map(int, input().split()))\nprint(sum(nums))",
    ),
    _ProgramFamily(
        "max_list", 1, "Read a line of integers separated by spaces and print the largest one.",
        _ints_line, lambda s: f"{max(map(int, s.split()))}\n",
        "nums = list(map(int, input().split()))\nprint(max(nums))",
    ),
    _ProgramFamily(
        "reverse_line", 1, "Read one line of text and print it reversed, character by character.",
        _text_line, lambda s: s.rstrip("\n")[::-1] + "\n",
        "line = input()\nprint(line[::-1])",
    ),
    _ProgramFamily(
        "count_vowels", 2, "Read one line of lowercase text and print how many vowels (a, e, i, o, u) it has.",
        _text_line, lambda s: f"{sum(ch in 'aeiou' for ch in s)}\n",
        "line = input()\nprint(sum(ch in 'aeiou' for ch in line))",
    ),
    _ProgramFamily(
        "palindrome", 2, "Read one word and print YES if it reads the same backwards, otherwise NO.",
        _palindrome_input, lambda s: ("YES" if s.strip() == s.strip()[::-1] else "NO") + "\n",
        "word = input().strip()\nprint('YES' if word == word[::-1] else 'NO')",
        CASELESS_CHECKER,
    ),
    _ProgramFamily(
        "sort_numbers", 3, "Read a line of integers separated by spaces and print them sorted ascending, separated by spaces.",
        _ints_line, lambda s: " ".join(map(str, sorted(map(int, s.split())))) + "\n",
        "nums = sorted(map(int, input().split()))\nprint(' '.join(map(str, nums)))",
    ),
    _ProgramFamily(
        "fizzbuzz", 3, "Read n and print the numbers 1..n, one per line, with Fizz for multiples of 3, "
        "Buzz for multiples of 5 and FizzBuzz for multiples of both.",
        lambda rng, size: f"{rng.randint(1, 5 * size)}\n", _fizzbuzz,
        "n = int(input())\nfor i in range(1, n + 1):\n    if i % 15 == 0:\n        print('FizzBuzz')\n"
        "    elif i % 3 == 0:\n        print('Fizz')\n    elif i % 5 == 0:\n        print('Buzz')\n    else:\n        print(i)",
    ),
    _ProgramFamily(
        "second_largest", 4, "Read a line of integers and print the second largest distinct value, or NONE if there is none.",
        _ints_line, _second_largest,
        "values = sorted(set(map(int, input().split())))\nprint(values[-2] if len(values) > 1 else 'NONE')",
    ),
)


def program(rng: random.Random, difficulty: int) -> Problem:
    """A stdin/stdout program from the families unlocked at ``difficulty``; an example plus 2 + d hidden
    tests of input size 2d, drawn again until their expected outputs differ (a constant program must fail)."""
    _check_difficulty(difficulty)
    family = rng.choice([f for f in PROGRAMS if f.min_difficulty <= difficulty])

    def case() -> dict:
        stdin = family.make_input(rng, 2 * difficulty)
        return {"input": stdin, "output": family.reference(stdin)}

    example = case()
    for _ in range(100):
        tests = [case() for _ in range(2 + difficulty)]
        if len({t["output"].strip().lower() for t in tests}) > 1:
            break
    accepts = checker_function(family.checker) if family.checker else (lambda out, exp, stdin: expects(out, exp))
    problem = degenerate_problem(tests, accepts)
    if problem:
        raise ValueError(f"generated task {family.name} (difficulty {difficulty}) is degenerate: {problem}")
    prompt = (
        f"Write a Python program. {family.statement}\n"
        f"Example input:\n{example['input']}Example output:\n{example['output']}"
    )
    solution = f"```python\n{family.source}\n```"
    return Problem(family.name, "code", prompt, solution, None, tests, family.checker, difficulty)


# ----------------------------------------------------------------------------- verifier


def _equivalent_forms(value: Fraction) -> list:
    """Other spellings of ``value`` that a verifier must accept."""
    forms = [f"{value.numerator * 2}/{value.denominator * 2}", f"\\frac{{{value.numerator * 3}}}{{{value.denominator * 3}}}"]
    if value.denominator == 1:
        forms += [f"{value.numerator}.0", f"x = {value.numerator}", f"{value.numerator}"]
    elif 10**6 % value.denominator == 0:
        forms += [f"{float(value):g}", f"{value.numerator}/{value.denominator}"]
    return forms


def _near_misses(value: Fraction, expression: Optional[str]) -> list:
    """Answers a verifier must reject: close in value or form (an unevaluated ``expression``), but not the reference."""
    misses = [_fraction_text(value + 1), _fraction_text(value - 1), _fraction_text(value * 10),
              f"{_fraction_text(value)} or {_fraction_text(value + 1)}"] + ([expression] if expression else [])
    if value != 0:
        misses.append(_fraction_text(-value))
    if value.denominator != 1:
        misses.append(f"{value.numerator}/{value.denominator + 1}")
    return misses


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def verify(rng: random.Random, difficulty: int) -> Problem:
    """Judge a candidate answer against the reference: half equivalent rewrites (YES), half near misses (NO)."""
    _check_difficulty(difficulty)
    if rng.random() < 0.5:
        base = arithmetic(rng, difficulty)
        question, value = base.prompt, Fraction(int(base.answer))
        expression = question.split(" ", 1)[1].rstrip("?.")
        reference = base.answer
    else:
        a, b = _number(rng, difficulty), rng.choice([2, 4, 5, 8, 10, 20, 25])
        question, value = f"What is {a} divided by {b}?", Fraction(a, b)
        expression = None  # a / b is itself the fraction, an answer
        reference = f"{float(value):g}" if rng.random() < 0.5 else _fraction_text(value)
    equivalent = rng.random() < 0.5
    candidate = rng.choice(_equivalent_forms(value) if equivalent else _near_misses(value, expression))
    key = f"{rng.getrandbits(32):08x}"
    label = "YES" if equivalent else "NO"
    prompt = build_verifier_prompt(question, reference, f"The answer is {candidate}.", key, thinking=True)
    why = "has the same value as" if equivalent else "is not the same single value as"
    solution = (f"The reference answer {reference} has the value {_fraction_text(value)}. The model answer {candidate} "
                f"{why} the reference.\nVERDICT {key}: {label}")
    return Problem("verify", "verify", prompt, solution, label, difficulty=difficulty, metadata={"verdict_key": key})


GENERATORS: dict = {
    "addition": addition,
    "largest": largest,
    "arithmetic": arithmetic,
    "linear_equation": linear_equation,
    "string_task": string_task,
    "program": program,
    "verify": verify,
}
# Families drawn when none are named; ``verify`` is asked for by name (long prompts, meant for a policy that judges).
DEFAULT_FAMILIES = ("arithmetic", "linear_equation", "string_task", "program")


# ----------------------------------------------------------------------------- sets


def _problems(num: int, seed: int, families: Optional[Sequence[str]], difficulty: Sequence[int]) -> list:
    families = list(families or DEFAULT_FAMILIES)
    unknown = [f for f in families if f not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; choose from {', '.join(GENERATORS)}")
    lo, hi = difficulty
    _check_difficulty(lo)
    _check_difficulty(hi)
    if lo > hi:
        raise ValueError(f"difficulty range ({lo}, {hi}): low end must not exceed high end")
    rng = random.Random(seed)
    return [GENERATORS[families[i % len(families)]](rng, rng.randint(lo, hi)) for i in range(num)]


def generate_prompts(
    num: int, seed: int = 0, families: Optional[Sequence[str]] = None, difficulty: Sequence[int] = (1, 3)
) -> list:
    """``num`` :class:`PromptRecord` s cycling over ``families``, difficulty drawn uniformly in the range."""
    records = []
    for i, p in enumerate(_problems(num, seed, families, difficulty)):
        records.append(
            PromptRecord(
                id=f"{p.kind}-{seed}-{i:06d}", domain=p.domain, prompt=p.prompt, reference_answer=p.answer,
                unit_tests=p.unit_tests, checker=p.checker,
                metadata={"difficulty": p.difficulty, "kind": p.kind, **p.metadata},
            )
        )
    return records


def system_prompt(configured: Optional[str]) -> Optional[str]:
    """The system turn for ``data.system_prompt``: :data:`SYSTEM_PROMPT` when None, no turn (None) when empty."""
    if configured is None:
        return SYSTEM_PROMPT
    return configured or None


def generate_sft(
    num: int, seed: int = 0, families: Optional[Sequence[str]] = None, difficulty: Sequence[int] = (1, 3),
    system: Optional[str] = SYSTEM_PROMPT, worked: bool = True,
) -> list:
    """``num`` conversations ``[{"role", "content"}, ...]``: the ``system`` turn (none when None), the user's
    prompt, the assistant's worked solution, or with ``worked=False`` only its final step (:meth:`Problem.final_step`)."""
    head = [{"role": "system", "content": system}] if system else []
    return [
        head + [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.solution if worked else p.final_step()}]
        for p in _problems(num, seed, families, difficulty)
    ]
