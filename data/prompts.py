"""RL prompt sets: the JSONL schema, validation and a streaming loader.

One JSON object per line::

    {"id": "arith-0001",                 # str, unique within the file
     "domain": "math",                   # str, e.g. math | code | puzzle | general
     "prompt": "What is 12 + 30?",       # str, the user turn given to the policy
     "reference_answer": "42",           # str or null (numbers are accepted and turned into str)
     "unit_tests": [{"input": "3\\n", "output": "6\\n"}],   # list of stdin/stdout cases, may be empty
     "checker": "def check(output, expected): ...",       # Python source or null
     "metadata": {"difficulty": 2}}      # object, free form

A record is *verifiable* when it has a reference answer or unit tests: a rule
verifier can then say right or wrong. ``checker``, when given, is Python source
defining ``check(output, expected[, input]) -> bool`` (the :mod:`data.checkers`
contract: only ``True`` accepts); the code sandbox applies it to each unit test's
program output (default: equal whitespace-separated tokens). Whether a wrong program
could pass a code task is checked where a run admits its prompts
(:func:`rl.rewards.factory.admit_prompts`). Blank lines are skipped. A bad record (invalid JSON,
missing or mistyped field, unknown field, duplicate id, checker that does not
compile) is reported with its line number and field, skipped, and counted: one bad
line never aborts a run.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

logger = logging.getLogger(__name__)


@dataclass
class PromptRecord:
    """One RL prompt; see the module docstring for the JSONL form of each field."""

    id: str
    domain: str
    prompt: str
    reference_answer: Optional[str] = None
    unit_tests: list = field(default_factory=list)  # [{"input": str, "output": str}, ...]
    checker: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    @property
    def verifiable(self) -> bool:
        """True when a rule verifier can score a response: a reference answer or unit tests exist."""
        return self.reference_answer is not None or bool(self.unit_tests)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


FIELDS = tuple(f.name for f in dataclasses.fields(PromptRecord))
REQUIRED = ("id", "domain", "prompt")


class RecordError(ValueError):
    """A record breaks the schema; ``field`` names the offending field (or ``"<line>"``)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass
class BadRecord:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: field '{self.field}': {self.message}"


@dataclass
class LoadReport:
    """What a load saw: good and bad record counts and every problem with its line number."""

    path: str = ""
    good: int = 0
    bad: list = field(default_factory=list)  # [BadRecord]

    @property
    def num_bad(self) -> int:
        return len(self.bad)

    def summary(self) -> str:
        return f"{self.path}: {self.good} records kept, {self.num_bad} bad records skipped"


def _check_str(name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not allow_empty and not value.strip():
        raise RecordError(name, "must not be empty")
    return value


def validate_record(obj: Any) -> PromptRecord:
    """Turn one decoded JSON value into a :class:`PromptRecord` or raise :class:`RecordError`."""
    if not isinstance(obj, dict):
        raise RecordError("<line>", f"expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid fields: {', '.join(FIELDS)}"
            raise RecordError(key, f"unknown field; {hint}")
    for name in REQUIRED:
        if name not in obj:
            raise RecordError(name, "required field is missing")
    rec_id = obj["id"]
    if isinstance(rec_id, int) and not isinstance(rec_id, bool):
        rec_id = str(rec_id)
    _check_str("id", rec_id)
    domain = _check_str("domain", obj["domain"])
    prompt = _check_str("prompt", obj["prompt"])
    answer = obj.get("reference_answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None:
        _check_str("reference_answer", answer, allow_empty=True)
    tests = obj.get("unit_tests") or []
    if not isinstance(tests, list):
        raise RecordError("unit_tests", f"expected a list of {{'input', 'output'}} objects, got {type(tests).__name__}")
    for i, case in enumerate(tests):
        if not isinstance(case, dict) or set(case) != {"input", "output"}:
            raise RecordError(f"unit_tests[{i}]", "expected an object with exactly the keys 'input' and 'output'")
        for key in ("input", "output"):
            _check_str(f"unit_tests[{i}].{key}", case[key], allow_empty=True)
    checker = obj.get("checker")
    if checker is not None:
        _check_str("checker", checker)
        try:
            compile(checker, "<checker>", "exec")
        except SyntaxError as e:
            raise RecordError("checker", f"Python syntax error at line {e.lineno}: {e.msg}") from None
        if "def check" not in checker:
            raise RecordError("checker", "must define check(output, expected) -> bool")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RecordError("metadata", f"expected an object, got {type(metadata).__name__}")
    return PromptRecord(rec_id, domain, prompt, answer, tests, checker, metadata)


def iter_prompt_records(path: Union[str, Path], report: Optional[LoadReport] = None) -> Iterator[PromptRecord]:
    """Stream valid records from a JSONL file, one line at a time.

    Bad records are logged as warnings (``line N: field 'F': ...``), appended to
    ``report.bad`` and skipped; the loader never raises for a bad line. A missing
    file raises ``FileNotFoundError``.
    """
    report = report if report is not None else LoadReport()
    report.path = str(path)
    seen: set = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError("<line>", f"invalid JSON at column {e.colno}: {e.msg}") from None
                record = validate_record(obj)
                if record.id in seen:
                    raise RecordError("id", f"duplicate id {record.id!r}; ids must be unique")
            except RecordError as e:
                bad = BadRecord(line_no, e.field, e.message)
                report.bad.append(bad)
                logger.warning("%s: %s (record skipped)", path, bad)
                continue
            seen.add(record.id)
            report.good += 1
            yield record


def load_prompts(path: Union[str, Path]) -> tuple:
    """Read a whole prompt file: ``(records, report)``; bad lines are skipped and reported."""
    report = LoadReport()
    records = list(iter_prompt_records(path, report))
    if report.num_bad:
        logger.warning(report.summary())
    return records, report


def write_prompts(records: list, path: Union[str, Path]) -> None:
    """Write records as JSONL (the inverse of :func:`load_prompts`)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record.to_json() + "\n")
