"""rollout.dtype=bf16: the engine samples from a bf16 copy of the trained weights (built once, refreshed in place
every generate call, bf16 KV cache), eager and compiled, under ep=2 as in one process; the PPO step then
recomputes the behaviour log-probs and applies truncated importance sampling; a bad dtype is refused."""
import pytest
import torch
from torch._dynamo.utils import counters

from megatron_seed.config import ConfigError, ParallelConfig, RolloutConfig, load_config
from megatron_seed.model.build import build_model_chunks
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from rl.rollout.engine import RolloutEngine, kv_bytes_per_slot, local_prompts
from rl.rollout.sampling import SamplingParams
from tests.model_utils import tiny_model
from tests.numerics import rel_err
from tests.rollout_utils import PROMPTS, SEED, single_model, trainer_log_probs
from tests.rl_trainer_utils import math_records, tiny_rl_config
from tests.test_rl_trainer import SFT, build, one_step

GREEDY = SamplingParams(temperature=0.0)
MAX_NEW = 10
pytestmark = pytest.mark.usefixtures("one_thread")


def engine(model, ps=None, **cfg) -> RolloutEngine:
    return RolloutEngine(model, ps or ParallelState.single(), RolloutConfig(**cfg), stop_ids=[], pad_id=0, seed=3)


def agreement(a: list, b: list) -> float:
    """Fraction of positions where two lists of token rows hold the same token."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def logprob_gap(out, model) -> float:
    """max |log-prob the rollout sampled with - the fp32 training forward's| over the response tokens."""
    mask = out.response_mask_BS
    return float((out.log_probs_BS[mask] - trainer_log_probs(model, out, ParallelState.single())[mask]).abs().max())


def test_bf16_rollout_samples_from_a_copy_refreshed_in_place_from_the_trained_weights():
    model = single_model()
    fp32 = engine(model).generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)
    eng = engine(model, dtype="bf16")
    assert not eng.samples_with_trained_weights and eng.policy is not model
    assert {p.dtype for p in eng.policy.parameters()} == {torch.bfloat16} and next(model.parameters()).dtype == torch.float32
    assert 2 * kv_bytes_per_slot(eng.policy) == kv_bytes_per_slot(model)  # the KV cache is bf16 too
    out = eng.generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)
    assert agreement(out.responses(), fp32.responses()) >= 0.9
    # the rollout's log-probs are bf16 ones: off the fp32 training forward by bf16 rounding, not by fp32's
    assert 1e-4 < logprob_gap(out, model) < 0.05

    storage = {name: p.data_ptr() for name, p in eng.policy.named_parameters()}
    with torch.no_grad():  # an "optimizer step" on the trained weights
        model.lm_head.weight.mul_(-1.0)
    flipped = eng.generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)
    trained = dict(model.named_parameters())
    for name, p in eng.policy.named_parameters():
        assert p.data_ptr() == storage[name], f"{name}: the copy was rebuilt instead of updated in place"
        assert torch.equal(p, trained[name].detach().to(torch.bfloat16)), f"{name}: not refreshed from the trained weights"
    assert agreement(flipped.responses(), out.responses()) < 0.5  # it generated with the new weights
    assert logprob_gap(flipped, model) < 0.05


def test_auto_samples_with_the_trained_weights_at_their_dtype():
    """rollout.dtype=auto (the default): a bf16-trained policy generates with its own weights, no copy and no
    recomputation; an explicit fp32 on it builds an fp32 copy."""
    model = single_model().to(torch.bfloat16)
    auto = engine(model)
    assert auto.cfg.dtype == "auto" and auto.policy is model and auto.samples_with_trained_weights
    assert len(auto.generate(PROMPTS, n=1, sampling=GREEDY, max_new_tokens=MAX_NEW).responses()) == len(PROMPTS)
    fp32 = engine(model, dtype="fp32")
    assert not fp32.samples_with_trained_weights and {p.dtype for p in fp32.policy.parameters()} == {torch.float32}


def test_every_engine_on_one_trained_chunk_shares_one_bf16_copy():
    """An RL run's rollout engine, its held-out evaluator's and its SFT validator's are three engines on the actor's
    chunk: one bf16 copy between them, refreshed by whichever generates next; another chunk gets its own."""
    model, other = single_model(), single_model()
    first, second = engine(model, dtype="bf16"), engine(model, dtype="bf16")
    assert first.policy is second.policy
    assert engine(other, dtype="bf16").policy is not first.policy
    before = second.generate(PROMPTS, n=1, sampling=GREEDY, max_new_tokens=MAX_NEW).responses()
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    first.generate(PROMPTS, n=1, sampling=GREEDY, max_new_tokens=MAX_NEW)
    after = second.generate(PROMPTS, n=1, sampling=GREEDY, max_new_tokens=MAX_NEW).responses()
    assert torch.equal(second.policy.lm_head.weight, model.lm_head.weight.detach().to(torch.bfloat16))
    assert agreement(after, before) < 0.5


def test_an_rl_run_holds_one_bf16_copy_for_its_rollout_evaluation_and_sft_validation(tmp_path):
    """The user's path: RLTrainer with rollout.dtype=bf16, held-out evaluation and an SFT phase stopping at a validation
    accuracy builds three engines on the actor's chunk; they share one copy."""
    cfg = tiny_rl_config(tmp_path, "rollout.dtype=bf16", "sft.steps=2", "sft.stop_accuracy=0.5", *SFT)
    rl = build(cfg, held_out=math_records(4, seed=1))
    validator = rl.phases[0].validator
    assert rl.evaluator is not None and validator is not None
    assert rl.engine.policy is rl.evaluator.engine.policy is validator.engine.policy
    assert rl.engine.policy is not rl.actor.chunks[0] and next(rl.engine.policy.parameters()).dtype == torch.bfloat16


def test_compiled_bf16_decode_agrees_with_eager_bf16():
    model = single_model()
    eager = engine(model, dtype="bf16").generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)
    counters.clear()
    compiled = engine(model, dtype="bf16", compile=True).generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # the bf16 decode step did compile
    assert agreement(compiled.responses(), eager.responses()) >= 0.9
    assert 1e-4 < logprob_gap(compiled, model) < 0.05


def _ep2_bf16_worker(rank: int, world: int) -> dict:
    ps = ParallelState.build(ParallelConfig(ep=2))
    (model,) = build_model_chunks(tiny_model(), ParallelConfig(ep=2), ps, SEED)
    mine = local_prompts(PROMPTS, ps)
    out = engine(model, ps, dtype="bf16").generate(mine, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW + 3 * rank)
    return {"prompts": mine, "responses": out.responses(), "log_probs": out.log_probs_BS[out.response_mask_BS]}


@pytest.mark.timeout(240)
def test_ep2_bf16_rollout_equals_one_process_bf16():
    single = single_model()
    for rank, got in enumerate(run_distributed(_ep2_bf16_worker, 2)):
        ref = engine(single, dtype="bf16").generate(got["prompts"], n=2, sampling=GREEDY, max_new_tokens=MAX_NEW + 3 * rank)
        assert got["responses"] == ref.responses(), rank
        assert rel_err(got["log_probs"], ref.log_probs_BS[ref.response_mask_BS]) <= 1e-2, rank  # bf16 rounding


@pytest.mark.timeout(300)
def test_bf16_rollout_ppo_step_recomputes_behaviour_logprobs_and_applies_tis(tmp_path, capsys):
    metrics, updates = one_step(tmp_path / "bf16", "rollout.dtype=bf16", "rl.tis_cap=2.0")
    first = updates[0]["actor"]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6)  # old log-probs are the training forward's, not the rollout's
    assert first["tis_weight"] != 1.0 and abs(first["tis_weight"] - 1.0) < 0.05  # bf16 vs fp32: weights near, not at, 1
    assert "inactive" not in capsys.readouterr().out
    exact, _ = one_step(tmp_path / "fp32", "rl.tis_cap=2.0")
    said = capsys.readouterr().out
    assert said.count("truncated importance sampling is inactive") == 1, said
    assert "actor/tis_weight" not in exact and "actor/tis_weight" in metrics


def test_a_rollout_dtype_other_than_fp32_or_bf16_is_refused():
    with pytest.raises(ConfigError, match=r"rollout\.dtype='fp16': must be one of auto, fp32, bf16"):
        load_config("tiny", overrides=["rollout.dtype=fp16"])
    with pytest.raises(ConfigError, match=r"rollout\.dtype='bf16' with rollout\.engine='external'"):
        load_config("tiny", overrides=["rollout.dtype=bf16", "rollout.engine=external", "rollout.external_url=http://h:1",
                                       "rollout.external_weights_dir=/tmp/w"])
    with pytest.raises(ConfigError, match=r"rollout\.dtype='fp16'"):
        engine(single_model(), dtype="fp16")
