"""Rollout engine on one process: greedy vs a no-cache reference, log-probs vs the trainer,
critic values, budget splitting, seeding, chat-text generation."""
import pytest
import torch
from torch._dynamo.utils import counters

from megatron_seed.config import ConfigError, RolloutConfig
from megatron_seed.parallel.state import ParallelState
from rl.rollout.engine import RolloutEngine, kv_bytes_per_slot
from rl.rollout.sampling import SamplingParams
from tests.numerics import assert_close_rel
from tests.rollout_utils import PROMPTS, greedy_reference, single_model, stop_token_for, trainer_log_probs

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9)
pytestmark = pytest.mark.usefixtures("one_thread")


def engine(model, stop_ids, critic=None, **cfg) -> RolloutEngine:
    return RolloutEngine(model, ParallelState.single(), RolloutConfig(**cfg), stop_ids=stop_ids, pad_id=0, seed=3, critic=critic)


def test_greedy_equals_full_recompute_reference_with_early_stops():
    model = single_model()
    max_new = 10
    stop = [stop_token_for(model, PROMPTS[0], 3, max_new)]  # row 0 ends early, the others may run to the limit
    out = engine(model, stop).generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=max_new)
    expected = [greedy_reference(model, p, max_new, stop) for p in PROMPTS for _ in range(2)]
    assert out.responses() == expected
    assert out.prompts() == [p for p in PROMPTS for _ in range(2)]
    assert out.prompt_index_B.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for resp, reason in zip(expected, out.finish_reasons):
        assert reason == ("stop" if resp[-1] in stop else "length")
        assert reason == "stop" or len(resp) == max_new
    assert out.finish_reasons[0] == "stop" and len(expected[0]) == 4
    assert out.response_lengths_B.tolist() == [len(r) for r in expected]
    assert out.response_mask_BS.sum(1).tolist() == [len(r) for r in expected]


def test_compiled_decode_equals_reference_and_trainer():
    """rollout.compile: greedy tokens equal the no-cache reference and the log-probs the trainer's,
    while early stops shrink the batch (the batch size is symbolic in the graph, so nothing recompiles for it)."""
    model = single_model()
    max_new = 10
    stop = [stop_token_for(model, PROMPTS[0], 3, max_new)]
    counters.clear()
    out = engine(model, stop, compile=True).generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=max_new)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode steps did go through torch.compile
    assert not counters["graph_break"], dict(counters["graph_break"])  # the whole step, MoE layers included, is one graph
    assert out.responses() == [greedy_reference(model, p, max_new, stop) for p in PROMPTS for _ in range(2)]
    assert out.finish_reasons[0] == "stop" and len(out.responses()[0]) == 4
    recomputed = trainer_log_probs(model, out, ParallelState.single())
    mask = out.response_mask_BS
    assert_close_rel(out.log_probs_BS[mask], recomputed[mask], 1e-5, "log-probs")


def test_compile_without_a_cpp_compiler_warns_and_decodes_eagerly(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.warns(UserWarning, match=r"decoding eagerly, because torch.compile on CPU needs a C\+\+ compiler"):
        eng = engine(single_model(), [1], compile=True)
    assert eng.decode_forward is None


def test_sampled_log_probs_equal_trainer_recompute():
    model = single_model()
    out = engine(model, [1]).generate(PROMPTS, n=3, sampling=SAMPLED, max_new_tokens=12)
    recomputed = trainer_log_probs(model, out, ParallelState.single(), SAMPLED.temperature)
    mask = out.response_mask_BS
    assert_close_rel(out.log_probs_BS[mask], recomputed[mask], 1e-5, "log-probs")
    assert (out.log_probs_BS[~mask] == 0).all()


def test_critic_values_are_values_of_the_state_before_each_token():
    model, critic = single_model(), single_model(value_head=True)
    out = engine(model, [1], critic=critic).generate(PROMPTS[:3], n=2, sampling=SAMPLED, max_new_tokens=6)
    with torch.no_grad():
        full = critic(out.tokens_BS, position_ids_BS=out.position_ids_BS, padding_mask_BS=out.attention_mask_BS)
    expected = torch.zeros_like(full)
    expected[:, 1:] = full[:, :-1]
    mask = out.response_mask_BS
    assert_close_rel(out.values_BS[mask], expected[mask], 1e-5, "values")
    assert (out.values_BS[~mask] == 0).all()


def test_budget_splits_batch_into_chunks_with_same_results():
    model = single_model()
    max_new = 8
    longest = max(len(p) for p in PROMPTS)
    two_rows_mb = 2.5 * kv_bytes_per_slot(model) * (longest + max_new) / 2**20
    big = engine(model, [1], kv_cache_budget_mb=64.0)
    small = engine(model, [1], kv_cache_budget_mb=two_rows_mb)
    assert len(small._plan_chunks([p for p in PROMPTS for _ in range(3)], max_new)) >= 4  # 12 rows, at most 3 per chunk
    for params in (GREEDY, SAMPLED):
        a = big.generate(PROMPTS, n=3, sampling=params, max_new_tokens=max_new)
        b = small.generate(PROMPTS, n=3, sampling=params, max_new_tokens=max_new)
        assert a.responses() == b.responses()  # rows draw from their own seeded noise: chunking changes nothing
        assert_close_rel(a.log_probs_BS, b.log_probs_BS, 1e-5, "log-probs")
    with pytest.raises(ConfigError, match="kv_cache_budget_mb"):
        engine(model, [1], kv_cache_budget_mb=two_rows_mb / 10).generate(PROMPTS, n=1, max_new_tokens=max_new)


def test_seeded_and_reproducible():
    model = single_model()
    a = engine(model, [1]).generate(PROMPTS, n=2, sampling=SAMPLED, max_new_tokens=8)
    b = engine(model, [1]).generate(PROMPTS, n=2, sampling=SAMPLED, max_new_tokens=8)
    assert a.responses() == b.responses()
    eng = engine(model, [1])
    first, second = eng.generate(PROMPTS, n=2, sampling=SAMPLED, max_new_tokens=8), eng.generate(PROMPTS, n=2, sampling=SAMPLED, max_new_tokens=8)
    assert first.responses() != second.responses()  # the engine's generator moves on between calls
    assert first.responses()[0] != first.responses()[1]  # the n samples of a prompt differ


def test_bad_input_is_refused_with_a_reason():
    model = single_model()
    eng = engine(model, [1])
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], n=1)
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[5, 999]], n=1)
    with pytest.raises(ConfigError, match="value head"):
        engine(single_model(value_head=True), [1])


def test_generate_text_uses_chat_template_and_strips_stop():
    from data.chat import ChatTemplate
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer("bundled")
    model = single_model(vocab_size=tok.vocab_size)
    eng = RolloutEngine(model, ParallelState.single(), RolloutConfig(max_new_tokens=6), tokenizer=tok, seed=0)
    texts = eng.generate_text(["What is 2+2?", "Hi"])
    template = ChatTemplate(tok)
    for prompt, text in zip(["What is 2+2?", "Hi"], texts):
        ids = template.render_prompt([{"role": "user", "content": prompt}])
        ref = greedy_reference(model, ids, 6, template.stop_ids)
        assert text == tok.decode(ref[:-1] if ref[-1] in template.stop_ids else ref)
