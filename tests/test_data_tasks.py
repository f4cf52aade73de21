"""Generated task families end to end through the reward router: worked solutions score 1, wrong answers 0;
degenerate tasks are refused when generated and when loaded; verify labels agree with the rule verifier."""
import dataclasses
import random

import pytest

from data.prompts import PromptRecord
from data.tasks import GENERATORS, PROGRAMS, generate_prompts, generate_sft, program
from megatron_seed.config import ConfigError, load_config
from rl.experience import scoring_sample
from rl.rewards.factory import admit_prompts, build_reward_router


@pytest.fixture(scope="module")
def router():
    cfg = load_config("tiny", None, ["rewards.sandbox_cpu_s=1", "rewards.sandbox_wall_s=3", "rewards.workers=4"])
    r = build_reward_router(cfg)
    yield r
    r.scorers["math"].close()


def records_and_solutions(family: str, n: int, seed: int):
    records = generate_prompts(n, seed=seed, families=[family], difficulty=(1, 5))
    solutions = [conv[2]["content"] for conv in generate_sft(n, seed=seed, families=[family], difficulty=(1, 5))]
    return records, solutions


def score(router, records, responses):
    return router.score_batch([scoring_sample(rec, resp) for rec, resp in zip(records, responses)])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("family", ["arithmetic", "linear_equation", "string_task", "verify"])
def test_answer_families_score_worked_solutions_1_and_wrong_answers_0(router, family):
    records, solutions = records_and_solutions(family, 24, seed=3)
    honest = score(router, records, solutions)
    assert all(r.correct and r.reward == 1.0 for r in honest), [r for r in honest if not r.correct]
    others = [rec.reference_answer for rec in records[1:] + records[:1]]
    wrong = []
    for rec, sol, other in zip(records, solutions, others):
        if family == "verify":
            flipped = "NO" if rec.reference_answer == "YES" else "YES"
            wrong += [sol.rsplit(":", 1)[0] + f": {flipped}", f"VERDICT {rec.metadata['verdict_key']}: YES or NO"]
        else:
            wrong += [f"The answer is {other}." if other != rec.reference_answer else "The answer is nothing.",
                      f"The answer is {rec.reference_answer} or {other}."]
        wrong += ["", "I am not sure."]
    wrong_records = [rec for rec in records for _ in range(4)]
    results = score(router, wrong_records, wrong)
    assert all(r.reward == 0.0 and not r.correct for r in results), [(w, r) for w, r in zip(wrong, results) if r.reward]


def wrong_programs(record) -> dict:
    tests = record.unit_tests
    other = {t["input"]: tests[(i + 1) % len(tests)]["output"] for i, t in enumerate(tests)}
    return {
        "empty": "```python\n\n```",
        "print(0)": "```python\nprint(0)\n```",
        "another case's expected output": f"```python\nimport sys\nsys.stdout.write({other!r}.get(sys.stdin.read(), ''))\n```",
        "input echoed back": "```python\nimport sys\nsys.stdout.write(sys.stdin.read())\n```",
    }


@pytest.mark.timeout(300)
def test_every_program_kind_scores_its_reference_1_and_wrong_programs_0(router):
    records, solutions = records_and_solutions("program", 60, seed=11)
    by_kind = {}
    for rec, sol in zip(records, solutions):
        by_kind.setdefault(rec.metadata["kind"], (rec, sol))
    assert set(by_kind) == {f.name for f in PROGRAMS}
    chosen = list(by_kind.values())
    honest = score(router, [rec for rec, _ in chosen], [sol for _, sol in chosen])
    assert all(r.correct and r.reward == 1.0 for r in honest), [(rec.id, r) for (rec, _), r in zip(chosen, honest)]
    rows = [(rec, name, prog) for rec, _ in chosen for name, prog in wrong_programs(rec).items()]
    results = score(router, [rec for rec, _, _ in rows], [prog for _, _, prog in rows])
    paid = [(rec.metadata["kind"], name, r) for (rec, name, _), r in zip(rows, results) if r.reward != 0.0 or r.correct]
    assert not paid, paid


def test_verify_labels_agree_with_the_math_verifier(router):
    records = generate_prompts(40, seed=5, families=["verify"], difficulty=(1, 5))
    assert {r.reference_answer for r in records} == {"YES", "NO"}
    samples = []
    for rec in records:
        key = rec.metadata["verdict_key"]
        reference = rec.prompt.split("Reference answer:\n")[1].split("\n\n")[0]
        candidate = rec.prompt.split(f"<answer-{key}>\n")[1].split(f"\n</answer-{key}>")[0]
        samples.append(scoring_sample(PromptRecord(rec.id, "math", "q", reference_answer=reference), candidate))
    verdicts = router.score_batch(samples)
    disagree = [(rec.prompt.split("Reference answer:\n")[1][:80], rec.reference_answer, v.reason)
                for rec, v in zip(records, verdicts) if v.correct != (rec.reference_answer == "YES")]
    assert not disagree, disagree


ACCEPT_ALL = "def check(output, expected):\n    return True\n"
NEVER_CALLED = "def check(output, expected):\n    return output.split() == expected.split()\nprint('checker loaded')\n"


def test_a_checker_that_accepts_everything_is_refused_when_generated(monkeypatch):
    import data.tasks as tasks

    lax = tuple(dataclasses.replace(f, checker=ACCEPT_ALL) for f in tasks.PROGRAMS)
    monkeypatch.setattr(tasks, "PROGRAMS", lax)
    with pytest.raises(ValueError, match=r"generated task \w+ .*degenerate: a wrong program \(empty program\) passes"):
        program(random.Random(0), 2)
    assert "verify" in GENERATORS


@pytest.mark.timeout(120)
def test_degenerate_code_tasks_are_refused_when_loaded(router):
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "4 4\n", "output": "8\n"}]
    good = PromptRecord("sum-ok", "code", "Add two numbers.", unit_tests=tests, checker=NEVER_CALLED)
    admit_prompts([good], router)  # the contract: check() decides, not the script's exit status
    lax = PromptRecord("sum-lax", "code", "Add two numbers.", unit_tests=tests, checker=ACCEPT_ALL)
    with pytest.raises(ConfigError, match=r"sum-lax: a wrong program \(empty program\) passes every test"):
        admit_prompts([good, lax], router)
    strict = PromptRecord("sum-none", "code", "Add.", unit_tests=tests, checker="def check(o, e):\n    return False\n")
    with pytest.raises(ConfigError, match="sum-none: no program passes"):
        admit_prompts([strict], router)
    same = PromptRecord("same", "code", "Print 1.", unit_tests=[{"input": "a\n", "output": "1\n"}, {"input": "b\n", "output": "1\n"}])
    with pytest.raises(ConfigError, match="same: every test expects the same output"):
        admit_prompts([same], router)


def test_a_domain_without_a_scorer_is_refused_at_load_with_the_fix(router):
    records = [PromptRecord("chat-1", "chat", "Write a poem."), PromptRecord("m-1", "math", "1+1?", reference_answer="2")]
    with pytest.raises(ConfigError, match=r"domain \['chat'\] route to 'pairwise'.*chat-1.*rewards.reward_model"):
        admit_prompts(records, router)
    with pytest.raises(ConfigError, match=r"'llm'.*rewards.llm_judge"):
        admit_prompts([PromptRecord("s-1", "stem", "Why?", reference_answer="because")], router)
    admit_prompts(generate_prompts(40, seed=1, families=list(GENERATORS)), router)


def test_data_system_prompt_sets_or_drops_the_system_turn_of_sft_rl_and_evaluation(tmp_path):
    from data.tasks import SYSTEM_PROMPT
    from megatron_seed.train.sft import sft_conversations
    from rl.rl_trainer import RLTrainer
    from tests.rl_trainer_utils import tiny_rl_config

    default = tiny_rl_config(tmp_path / "default", "sft.examples=2")
    assert sft_conversations(default)[0][0] == {"role": "system", "content": SYSTEM_PROMPT}
    custom = tiny_rl_config(tmp_path / "custom", "sft.examples=2", "data.system_prompt=Be brief.")
    assert sft_conversations(custom)[0][0] == {"role": "system", "content": "Be brief."}
    none = tiny_rl_config(tmp_path / "none", "sft.examples=2", "data.system_prompt=''")
    assert [m["role"] for m in sft_conversations(none)[0]] == ["user", "assistant"]
    trainer = RLTrainer.from_config(none)
    assert trainer.system is None and trainer.evaluator.system is None  # RL prompts and held-out prompts alike


def test_generated_rl_prompts_default_to_one_fresh_prompt_per_ppo_slot_and_sft_can_drop_the_working(tmp_path):
    from megatron_seed.train.sft import sft_conversations
    from rl.rl_trainer import RLTrainer
    from tests.rl_trainer_utils import tiny_rl_config

    cfg = tiny_rl_config(tmp_path / "fresh", "data.num_tasks=null", "rl.steps=3", "rl.eval_prompts=0",
                         "data.task_families=[addition]", "data.task_difficulty=[1,1]")
    trainer = RLTrainer.from_config(cfg)
    drawn = [p.record.id for _ in range(6) for p in trainer.sampler.sample(cfg.rl.prompts_per_step)]
    assert len(set(drawn[:12])) == 12  # rl.steps x rl.prompts_per_step tasks, none drawn twice in the run's 3 steps
    assert set(drawn[12:]) == set(drawn[:12])  # and no more: 3 steps further the same tasks come again
    pinned = RLTrainer.from_config(tiny_rl_config(tmp_path / "pinned", "data.num_tasks=2", "rl.eval_prompts=0"))
    assert len({p.record.id for p in pinned.sampler.sample(4)}) == 2  # a pool of two: drawn again and again
    with pytest.raises(ConfigError, match=r"data.num_tasks=0: must be >= 1"):
        tiny_rl_config(tmp_path / "bad", "data.num_tasks=0")

    answers = tiny_rl_config(tmp_path / "answers", "sft.examples=6", "data.worked_solutions=false",
                             "data.task_families=[addition,verify,program]")
    worked = tiny_rl_config(tmp_path / "worked", "sft.examples=6", "data.task_families=[addition,verify,program]")
    short, long = [c[-1]["content"] for c in sft_conversations(answers)], [c[-1]["content"] for c in sft_conversations(worked)]
    assert short[0] == long[0].split(". ", 1)[1] and short[0].startswith("The answer is ")  # addition: the worked line dropped
    assert short[1] == long[1].splitlines()[-1] and short[1].startswith("VERDICT ")  # verify: the verdict line alone
    assert short[2] == long[2]  # program: the code is the solution either way
