"""Final-answer extraction and normalisation shared by the rule scorers; every function is linear time.

Extraction (:func:`extract_final_answer`), in order of preference:
1. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces close;
2. the text after the last ``Answer:`` / ``answer is`` / ``final answer is`` marker, up to the line end;
3. the whole response, when it is nothing but one number (``42``).
There is no "last number anywhere" fallback: it would hand out rewards for a number that
merely appears in the reasoning.

Numbers: a *numeric literal* is an integer, a decimal (``1,234.5``, ``.5``, ``1e-3``), a
percentage, a fraction ``a/b`` or ``\\frac{a}{b}``, a mixed number ``1\\frac{1}{2}``, with an
optional sign, LaTeX spacing, ``\\left( \\right)``, a currency sign or a trailing
``\\text{unit}``; anything else (``4821 + 377``, ``2 -3``, ``5 or 6``, ``[4, 6]``, ``x``) is not.
An *unevaluated* answer applies an operation to numbers (``4821 + 377``, ``2 -3``,
``10^{3}``, ``\\log_2 8``): it restates a computation instead of giving its result.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

MAX_ANSWER_CHARS = 400  # a final answer longer than this is not an answer (and stays cheap to compare)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARKER = re.compile(r"(?:final answer is|answer\s*:|answer is)", re.IGNORECASE)
_DECIMAL = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d{1,3})?%?")  # |exponent| < 1000
_FRACTION = re.compile(r"([+-]?)(\d+)\s*/\s*(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)(\d+\s*)?\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\\\$|\$")
_TRAILING_TEXT_UNIT = re.compile(r"(?<=[\d}%])\\(?:text|mbox|mathrm)\{[^{}]*\}$")
_SHORT_FRACTION = re.compile(r"\\frac(\d)(\d)")
_OPERATION = re.compile(r"[\w}).]\s*(?:[-+*/^×÷·]|\\times|\\cdot|\\div)|\d\s+[-+]?\.?\d"
                        r"|\\(?:log|ln|lg|exp|sin|cos|tan|sqrt|binom|sum|prod|int)\b|\d\s*!")
_VARIABLE = re.compile(r"[A-Za-z]\s*=\s*")
_WORD = re.compile(r"[A-Za-z]+\.?")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` whose braces balance, or None: one pass with a brace stack."""
    boxed_opens = {m.end() - 1 for m in _BOXED.finditer(text)}
    if not boxed_opens:
        return None
    stack: list = []
    best: Optional[tuple] = None
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            start = stack.pop()
            if start in boxed_opens and (best is None or start > best[0]):
                best = (start, i)
    return text[best[0] + 1:best[1]].strip() if best else None


def extract_final_answer(response: str) -> Optional[str]:
    """The response's final answer as a string (see the module docstring), or None."""
    boxed = last_boxed(response)
    if boxed:
        return boxed
    last = None
    for last in _ANSWER_MARKER.finditer(response):
        pass
    if last is not None:
        line = response[last.end():].lstrip(" \t:").split("\n", 1)[0]
        line = line.strip().strip("$").strip()
        while line.endswith("."):
            line = line[:-1].rstrip()
        return line or None
    bare = response.strip()
    return bare if bare and is_numeric_literal(bare) else None


def normalize_answer(answer: str) -> str:
    """Strip what carries no value: ``$``, a trailing period, a leading ``x =``, trailing plain-word units."""
    text = " ".join(answer.split()).strip("$ ")
    while text.endswith("."):
        text = text[:-1].rstrip()
    m = _VARIABLE.match(text)
    if m:
        text = text[m.end():]
    head, _, tail = text.partition(" ")
    if tail and is_numeric_literal(head) and all(_WORD.fullmatch(w) for w in tail.split(" ")):
        return head  # "12 apples" -> "12"; a string of words after a number never becomes part of it
    return text


def _number_text(text: str) -> str:
    """``text`` without what never changes a number's value: LaTeX spacing, ``\\left``/``\\right``, ``$``,
    a trailing ``\\text{unit}``, enclosing ``( )`` / ``{ }``; ``\\dfrac``/``\\tfrac``/``\\frac12`` -> ``\\frac{1}{2}``."""
    t = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    t = _TRAILING_TEXT_UNIT.sub("", t.strip())
    t = _SHORT_FRACTION.sub(r"\\frac{\1}{\2}", _LATEX_NOISE.sub("", t)).strip()
    while len(t) > 1 and (t[0], t[-1]) in (("(", ")"), ("{", "}")) and t.count(t[0]) == 1:
        t = t[1:-1]
    return t


def numeric_value(text: str) -> Optional[tuple]:
    """``(value, is_percent)`` of a numeric literal as an exact Fraction, or None when it is not one."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    text = _number_text(text)
    if not text:
        return None
    m = _FRACTION.fullmatch(text)
    if m:
        if int(m.group(3)) == 0:
            return None
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return (-value if m.group(1) == "-" else value), False
    m = _LATEX_FRACTION.fullmatch(text)
    if m:
        if int(m.group(4)) == 0:
            return None
        value = Fraction(int(m.group(3)), int(m.group(4)))
        if m.group(2):  # mixed number: 1\frac{1}{2} = 1 + 1/2
            if value < 0:
                return None
            value += int(m.group(2))
        return (-value if m.group(1) == "-" else value), False
    if not any(ch.isdigit() for ch in text) or not _DECIMAL.fullmatch(text):
        return None
    percent = text.endswith("%")
    try:
        value = Fraction(text.rstrip("%").replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return (value / 100 if percent else value), percent


def is_unevaluated(text: str) -> bool:
    """True when ``text`` applies an operation to numbers (see the module docstring)."""
    return _OPERATION.search(text) is not None


def is_numeric_literal(text: str) -> bool:
    return numeric_value(text) is not None


def numbers_equal(answer: str, reference: str) -> bool:
    """Exact equality of two numeric literals; a percentage also matches its plain number (``50%`` ~ ``50``)."""
    a, r = numeric_value(answer), numeric_value(reference)
    if a is None or r is None:
        return False
    if a[0] == r[0]:
        return True
    return a[1] and not r[1] and a[0] * 100 == r[0]


def answer_tokens(text: str) -> list:
    """Case-folded tokens of an exact-string answer: split at commas and whitespace, quotes dropped."""
    return [t for t in re.split(r"[,\s]+", text.casefold().strip().strip("'\"`")) if t]
