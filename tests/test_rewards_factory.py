"""The config-built reward router: rewards.* validation, LLM judge by URL or our own policy, a reward-model
checkpoint, and a mixed RL batch (verify tasks included) scored with reason counts and loss masks."""
import re

import pytest

from data.prompts import PromptRecord
from data.tasks import generate_prompts, generate_sft
from megatron_seed.config import ConfigError, ModelConfig, MoEConfig, load_config
from rl.experience import scoring_sample
from rl.rewards.base import CATEGORIES, loss_mask, reason_counts
from rl.rewards.factory import build_reward_router
from rl.rewards.llm_verifier import OpenAIJudge
from rl.rewards.pairwise_rm import ByteEncoder, RewardModel, save_reward_model

FAST = ["rewards.sandbox_cpu_s=1", "rewards.sandbox_wall_s=3", "rewards.math_workers=1"]


def config(*overrides):
    return load_config("tiny", None, FAST + list(overrides))


@pytest.mark.parametrize("overrides,message", [
    (["rewards.llm_judge=url"], "rewards.llm_judge=url needs rewards.judge_url"),
    (["rewards.judge_url=http://h:1/v1"], "rewards.judge_url=.* is set but rewards.llm_judge='none'"),
    (["rewards.llm_judge=maybe"], "rewards.llm_judge"),
    (["rewards.code_mode=most"], "rewards.code_mode"),
    (["rewards.reward_model=/no/such/rm.pt"], "rewards.reward_model=.*no such file"),
    (["rewards.math_timeout_s=0"], "rewards.math_timeout_s"),
])
def test_bad_rewards_config_is_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", None, overrides)


def test_judge_function_and_llm_judge_must_agree():
    with pytest.raises(ConfigError, match="llm_judge='none' but a judge function was given"):
        build_reward_router(config(), judge=lambda prompts: prompts)
    with pytest.raises(ConfigError, match="llm_judge='policy' but a judge function was not given"):
        build_reward_router(config("rewards.llm_judge=policy"))


def test_default_router_and_url_judge():
    router = build_reward_router(config("rewards.llm_judge=url", "rewards.judge_url=http://127.0.0.1:9/v1"))
    try:
        assert set(router.scorers) == {"math", "exact", "verify", "code", "llm"}
        judge = router.scorers["llm"].judge
        assert isinstance(judge, OpenAIJudge) and judge.url == "http://127.0.0.1:9/v1/chat/completions"
        assert router.scorers["code"].config.mode == "all" and router.config.max_length is None
    finally:
        router.scorers["math"].close()


def test_policy_verifies_itself_through_callable_judge():
    calls = []

    def policy(prompts):  # stands in for the rollout engine: one batched call, answers in the requested format
        calls.append(len(prompts))
        out = []
        for p in prompts:
            key = p.rsplit("VERDICT ", 1)[1].split(":")[0]
            ok = "The answer is 42" in p.split(f"<answer-{key}>")[1]
            out.append(f"Checked.\nVERDICT {key}: {'YES' if ok else 'NO'}")
        return out

    router = build_reward_router(config("rewards.llm_judge=policy"), judge=policy)
    try:
        samples = [scoring_sample(PromptRecord(f"s{i}", "stem", "What is 6 * 7?", reference_answer="42"), r)
                   for i, r in enumerate(["The answer is 42.", "The answer is 41.", "The answer is 42, I think."])]
        results = router.score_batch(samples)
    finally:
        router.scorers["math"].close()
    assert [r.correct for r in results] == [True, False, True] and calls == [3]


def test_reward_model_checkpoint_from_config(tmp_path):
    cfg = ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                      max_seq_len=64, value_head=True, moe=MoEConfig(num_experts=4, top_k=2, ffn_size=32))
    path = tmp_path / "rm.pt"
    save_reward_model(cfg, RewardModel(cfg, ByteEncoder(), seed=3).gpt.state_dict(), str(path))
    router = build_reward_router(config(f"rewards.reward_model={path}", "rewards.reward_model_tokenizer=bytes"))
    try:
        group = ["a", "bb", "ccc"]
        results = router.score_batch([scoring_sample(PromptRecord("c", "chat", "Say something."), r) for r in group])
        assert all(0.0 < r.reward < 1.0 and "over 2 comparisons" in r.reason for r in results)  # the batch is the group
        assert abs(sum(r.reward for r in results) - 1.5) < 1e-5  # win rates of a round robin average to one half
    finally:
        router.scorers["math"].close()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=re.escape(str(corrupt))):
        build_reward_router(config(f"rewards.reward_model={corrupt}", "rewards.reward_model_tokenizer=bytes"))


@pytest.mark.timeout(240)
def test_mixed_batch_with_verify_tasks_gives_reason_counts_and_masks():
    families = ["arithmetic", "linear_equation", "string_task", "program", "verify"]
    records = generate_prompts(10, seed=7, families=families, difficulty=(1, 2))
    solutions = [c[2]["content"] for c in generate_sft(10, seed=7, families=families, difficulty=(1, 2))]
    wrong = ["The answer is nothing." if r.domain != "code" else "```python\nprint(0)\n```" for r in records]
    broken = PromptRecord("no-ref", "math", "What is 1 + 1?")  # a record without a reference: the scorer raises
    samples = [scoring_sample(r, s) for r, s in zip(records, solutions)] + \
        [scoring_sample(r, w) for r, w in zip(records, wrong)] + [scoring_sample(broken, "The answer is 2.")]
    router = build_reward_router(config())
    try:
        results = router.score_batch(samples)
    finally:
        router.scorers["math"].close()
    assert {r.domain for r in records} >= {"math", "puzzle", "code", "verify"}
    counts = reason_counts(results)
    assert set(counts) == set(CATEGORIES) | {"masked"}
    assert counts["passed"] == 10 and counts["wrong_answer"] + counts["no_answer"] == 10
    assert counts["scoring_error"] == 1 and counts["masked"] == 1
    assert loss_mask(results) == [True] * 20 + [False]
    assert "MathVerifier: sample has no 'reference'" in results[-1].reason


@pytest.mark.timeout(240)
def test_our_rollout_engine_as_the_judge():
    """The policy verifying itself: the engine's generate_text is the judge. An untrained policy writes no keyed
    verdict, so its judgements are masked, never scored as wrong answers."""
    from data.tokenizer import load_tokenizer
    from megatron_seed.config import RolloutConfig
    from megatron_seed.parallel.state import ParallelState
    from rl.rollout.engine import RolloutEngine
    from tests.rollout_utils import single_model

    tok = load_tokenizer("bundled")
    engine = RolloutEngine(single_model(vocab_size=tok.vocab_size, max_seq_len=1024), ParallelState.single(),
                           RolloutConfig(max_new_tokens=8), tokenizer=tok, seed=0)
    router = build_reward_router(config("rewards.llm_judge=policy"), judge=engine.generate_text)
    try:
        samples = [scoring_sample(PromptRecord(f"s{i}", "stem", "What is 6 * 7?", reference_answer="42"), r)
                   for i, r in enumerate(["The answer is 42.", "The answer is 41."])]
        results = router.score_batch(samples)
    finally:
        router.scorers["math"].close()
    assert all(r.masked and r.category == "judge_error" and "no verdict line" in r.reason for r in results), results
