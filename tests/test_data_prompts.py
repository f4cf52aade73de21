"""RL prompt schema validation, filter rules and the procedural task generators."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data.filters import FilterConfig, PromptScores, decide, filter_prompts, kept_records
from data.prompts import PromptRecord, iter_prompt_records, load_prompts, write_prompts
from data.checkers import checker_function, expects
from data.tasks import GENERATORS, generate_prompts, generate_sft


def _good(i):
    return {"id": f"p{i}", "domain": "math", "prompt": f"What is {i} + 1?", "reference_answer": str(i + 1)}


def test_bad_records_are_reported_by_line_and_field_and_good_ones_kept(tmp_path, caplog):
    lines = [
        json.dumps(_good(1)),                                              # 1 ok
        "{not json",                                                       # 2 invalid JSON
        json.dumps({"id": "p3", "domain": "math"}),                        # 3 prompt missing
        "",                                                                # 4 blank: ignored
        json.dumps({**_good(5), "refrence_answer": "6"}),                  # 5 unknown field (typo)
        json.dumps({**_good(6), "unit_tests": [{"input": "1"}]}),          # 6 test case without output
        json.dumps({**_good(7), "checker": "def check(a, b):\n  return ("}),  # 7 syntax error
        json.dumps({**_good(8), "domain": 3}),                             # 8 wrong type
        json.dumps(_good(1)),                                              # 9 duplicate id
        json.dumps({**_good(10), "reference_answer": 11, "metadata": {"level": 2}}),  # 10 ok, number answer
        json.dumps([1, 2]),                                                # 11 not an object
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, report = load_prompts(path)
    assert [r.id for r in records] == ["p1", "p10"] and records[1].reference_answer == "11"
    assert report.good == 2 and report.num_bad == 8
    where = {(b.line, b.field) for b in report.bad}
    assert where == {
        (2, "<line>"), (3, "prompt"), (5, "refrence_answer"), (6, "unit_tests[0]"),
        (7, "checker"), (8, "domain"), (9, "id"), (11, "<line>"),
    }
    assert "did you mean 'reference_answer'" in str(next(b for b in report.bad if b.line == 5))
    assert "line 7: field 'checker'" in caplog.text
    assert "2 records kept, 8 bad records skipped" in report.summary()


def test_loader_streams_and_round_trips(tmp_path):
    records = generate_prompts(12, seed=3)
    write_prompts(records, tmp_path / "p.jsonl")
    stream = iter_prompt_records(tmp_path / "p.jsonl")
    assert next(stream) == records[0]  # lazily, one record at a time
    assert load_prompts(tmp_path / "p.jsonl")[0] == records


def test_filter_drops_all_correct_and_zero_variance_prompts():
    cfg = FilterConfig(hard_pass_rate=0.0, min_score_variance=1e-3)
    scores = [
        PromptScores("easy", "math", True, [1.0] * 8, [True] * 8),
        PromptScores("mixed", "math", True, [1, 0, 1, 0, 0, 0, 1, 1], None),  # flags from rewards
        PromptScores("hard", "code", True, [0.0] * 8, [False] * 8),
        PromptScores("flat", "chat", False, [0.7] * 8),
        PromptScores("spread", "chat", False, [0.1, 0.9, 0.4, 0.6]),
    ]
    decisions, report = filter_prompts(scores, cfg)
    by_id = {d.prompt_id: d for d in decisions}
    assert (by_id["easy"].keep, by_id["easy"].reason, by_id["easy"].pass_rate) == (False, "too_easy", 1.0)
    assert (by_id["mixed"].keep, by_id["mixed"].pass_rate) == (True, 0.5)
    assert by_id["hard"].reason == "too_hard"
    assert (by_id["flat"].keep, by_id["flat"].reason) == (False, "low_variance")
    assert by_id["spread"].keep and by_id["spread"].score_variance == pytest.approx(0.085)
    assert report.to_dict()["math"] == {"kept": 1, "too_easy": 1, "too_hard": 0, "low_variance": 0}
    assert report.total("kept") == 2 and report.total() == 5 and "low_variance" in report.format()
    records = [PromptRecord(i, "math", "q") for i in ("easy", "mixed", "spread")]
    assert [r.id for r in kept_records(records, decisions)] == ["mixed", "spread"]
    # Default config keeps prompts no sample solves (too-hard filtering is opt-in).
    assert decide(scores[2], FilterConfig()).keep


def test_filter_config_and_inputs_are_validated():
    with pytest.raises(ValueError, match="easy_pass_rate"):
        FilterConfig(easy_pass_rate=0.0)
    with pytest.raises(ValueError, match="no sampled rewards"):
        decide(PromptScores("x", "math", True, []), FilterConfig())


@pytest.mark.parametrize("family", sorted(GENERATORS))
def test_task_records_are_valid_reproducible_and_harder_with_difficulty(family):
    easy = generate_prompts(20, seed=1, families=[family], difficulty=(1, 1))
    hard = generate_prompts(20, seed=1, families=[family], difficulty=(5, 5))
    assert easy == generate_prompts(20, seed=1, families=[family], difficulty=(1, 1))
    assert easy != generate_prompts(20, seed=2, families=[family], difficulty=(1, 1))
    for r in easy + hard:
        from data.prompts import validate_record

        assert validate_record(json.loads(r.to_json())) == r and r.verifiable
    assert sum(len(r.prompt) for r in hard) > sum(len(r.prompt) for r in easy)


def test_worked_solutions_reach_the_reference_answer():
    for record, conv in zip(generate_prompts(60, seed=9), generate_sft(60, seed=9)):
        assert conv[1]["content"] == record.prompt
        if record.reference_answer is not None:
            assert conv[2]["content"].endswith(f"The answer is {record.reference_answer}.")


def test_reference_programs_pass_their_unit_tests_under_their_checker():
    programs = [
        (r, c) for r, c in zip(generate_prompts(80, seed=4, families=["program"], difficulty=(1, 5)),
                               generate_sft(80, seed=4, families=["program"], difficulty=(1, 5)))
    ]
    first_of_kind: dict = {}
    for record, conv in programs:
        first_of_kind.setdefault(record.metadata["kind"], (record, conv))
    assert len(first_of_kind) >= 6
    for record, conv in first_of_kind.values():  # every kind's program: its generator, checker and tests differ
        source = conv[2]["content"].removeprefix("```python\n").removesuffix("\n```")
        accepts = checker_function(record.checker) if record.checker else (lambda out, exp, stdin: expects(out, exp))
        for case in record.unit_tests:
            out = subprocess.run([sys.executable, "-c", source], input=case["input"], capture_output=True, text=True)
            assert accepts(out.stdout, case["output"], case["input"]), (record.id, case)
        assert not accepts("definitely wrong\n", record.unit_tests[0]["output"], record.unit_tests[0]["input"])


def test_math_answers_are_correct():
    for record in generate_prompts(50, seed=6, families=["arithmetic"], difficulty=(1, 5)):
        expr = record.prompt.split(" ", 2)[-1].rstrip("?.") if record.prompt.startswith("What") else record.prompt.split(" ", 1)[1].rstrip("?.")
        assert eval(expr) == int(record.reference_answer)
    for record in generate_prompts(50, seed=6, families=["linear_equation"], difficulty=(1, 5)):
        var = record.prompt.split("for ")[-1][0] if record.prompt.startswith("Solve") else (
            record.prompt.split(" ")[1] if record.prompt.startswith("Find") else record.prompt.split("of ")[1][0])
        equation = record.prompt.split(": ", 1)[-1] if record.prompt.startswith("Solve") else (
            record.prompt.split(" if ")[-1] if record.prompt.startswith("Find") else record.prompt.split("satisfies ")[-1])
        lhs, rhs = equation.rstrip("?.").split(" = ")
        value = int(record.reference_answer)
        py = lambda side: eval(side.replace(var, f"*({value})"))  # noqa: E731  "3x" -> "3*(v)"
        assert py(lhs) == py(rhs), record.prompt
