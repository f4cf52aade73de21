"""Held-out evaluation: strict ground-truth scoring, and the evaluator end to end on a policy SFT taught one answer."""
import dataclasses

import pytest
import torch

from data.prompts import PromptRecord
from data.tasks import generate_prompts, generate_sft
from data.tokenizer import load_tokenizer
from megatron_seed.config import ConfigError, RolloutConfig, SFTConfig
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.sft import SFT
from rl.evaluate import HeldOutEvaluator, exclude_prompts, final_answer, ground_truth_correct
from rl.rewards.sandbox import Sandbox
from tests.model_utils import tiny_config, tiny_model


def _record(answer=None, tests=(), prompt="q") -> PromptRecord:
    return PromptRecord(id="r", domain="math" if answer is not None else "code", prompt=prompt, reference_answer=answer,
                        unit_tests=list(tests))


def test_final_answer_is_the_last_answer_line():
    assert final_answer("Step 1: 2 + 2 = 4. The answer is 4.") == "4"
    assert final_answer("The answer is 3.\nNo wait. The answer is 5.") == "5"
    assert final_answer("The answer is 12\nmore text") == "12"
    assert final_answer("\\boxed{4}") is None


@pytest.mark.parametrize("response,correct", [
    ("12 + 30 = 42. The answer is 42.", True),
    ("12 + 30 = 42. The answer is 43.", False),  # a wrong answer scores 0
    ("The answer is 42.0.", False),  # equal in value, not the exact answer
    ("\\boxed{42}", False),  # what a math verifier accepts, without the task's answer line
    ("The answer is 42 apples.", False),
])
def test_answers_are_compared_exactly(response, correct):
    assert ground_truth_correct(_record("42"), response)[0] is correct


def test_programs_must_pass_every_test_exactly():
    record = generate_prompts(1, seed=3, families=["program"], difficulty=(1, 1))[0]
    reference = generate_sft(1, seed=3, families=["program"], difficulty=(1, 1))[0][2]["content"]
    sandbox = Sandbox(workers=1)
    assert ground_truth_correct(record, reference, sandbox) == (True, f"{len(record.unit_tests)}/{len(record.unit_tests)} tests")
    first = record.unit_tests[0]["output"]
    hard_coded = f"```python\nprint({first.strip()!r})\n```"  # right on the example only
    ok, reason = ground_truth_correct(record, hard_coded, sandbox)
    assert not ok and "wrong output" in reason
    extra_space = reference.replace("print(", "print(' ' + str(", 1).replace("\n```", ")\n```", 1)
    assert not ground_truth_correct(record, extra_space, sandbox)[0]  # a token-wise checker would accept it
    with pytest.raises(ConfigError, match="sandbox"):
        ground_truth_correct(record, reference)
    with pytest.raises(ConfigError, match="neither"):
        ground_truth_correct(_record(), "x")


def test_exclude_prompts_keeps_the_evaluation_held_out():
    train = generate_prompts(50, seed=1, families=["addition"], difficulty=(1, 1))
    held = train[:5]
    kept = exclude_prompts(train, held)
    assert len(kept) <= 45 and not {r.prompt for r in kept} & {r.prompt for r in held}


def _policy_that_answers_seven(tokenizer):
    """A tiny GPT-MoE taught by the real SFT loop to reply 'The answer is 7.' to any question."""
    cfg = tiny_config(tiny_model(vocab_size=2048, max_seq_len=96), micro_batch_size=4, global_batch_size=4, seq_len=64)
    cfg.sft = SFTConfig(steps=40, lr=1e-2, warmup_steps=2)
    conversations = [[{"role": "user", "content": f"What is {i} plus {i % 3}?"}, {"role": "assistant", "content": "The answer is 7."}]
                     for i in range(32)]
    sft = SFT(cfg, ParallelState.single(), tokenizer, conversations)
    assert sft.run()["loss"] < 0.1
    return sft.trainer.chunks


@pytest.mark.timeout(240)
def test_evaluator_scores_ground_truth_per_domain_deterministically(one_thread):
    tokenizer = load_tokenizer("bundled")
    policy = _policy_that_answers_seven(tokenizer)
    records = [dataclasses.replace(_record("7", prompt=f"What is {i} minus 1?"), id=f"a{i}") for i in range(3)]
    records += [dataclasses.replace(_record("8", prompt=f"What is {i} times 2?"), id=f"b{i}", domain="puzzle") for i in range(2)]
    rollout = RolloutConfig(max_new_tokens=12, temperature=1.0)
    evaluator = HeldOutEvaluator(records, policy, ParallelState.single(), rollout, tokenizer, seed=5, samples=3)
    report = evaluator.evaluate()
    assert report.greedy_acc == {"math": 1.0, "puzzle": 0.0}  # the same reply: right for 7, wrong for 8
    assert report.pass_at_k["puzzle"] == 0.0 and report.sampled_acc["puzzle"] == 0.0
    assert report.overall_greedy_acc == pytest.approx(0.6)
    assert report.metrics()["eval/math/greedy_acc"] == 1.0 and "eval/puzzle/pass@3" in report.metrics()
    again = evaluator.evaluate()  # the same weights and seed: the same samples and scores
    assert (again.sampled_acc, again.pass_at_k) == (report.sampled_acc, report.pass_at_k)
    with pytest.raises(ConfigError, match="no prompts"):
        HeldOutEvaluator([], policy, ParallelState.single(), rollout, tokenizer, seed=5, samples=3)
