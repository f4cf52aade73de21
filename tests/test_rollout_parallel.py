"""Rollout under tp=2 (with and without sequence parallel, kv heads split or replicated at tp=4), ep=2 and pp=2 equals one process."""
import pytest
import torch

from megatron_seed.config import ParallelConfig, RolloutConfig
from megatron_seed.model.build import build_model_chunks
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from rl.rollout.engine import RolloutEngine, kv_bytes_per_slot, local_prompts
from rl.rollout.sampling import SamplingParams
from tests.model_utils import tiny_model
from tests.numerics import assert_close_rel
from tests.rollout_utils import PROMPTS, SEED, greedy_reference, single_model, stop_token_for, trainer_log_probs

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0)
SAMPLING = (SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9, top_k=20))


def _engine(model, ps, stop, **cfg) -> RolloutEngine:
    return RolloutEngine(model, ps, RolloutConfig(**cfg), stop_ids=stop, pad_id=0, seed=5)


def _assert_rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    assert_close_rel(a[mask], b[mask], 1e-5, "log-probs of the response tokens")


def _build(parallel: ParallelConfig, **model_changes) -> tuple:
    ps = ParallelState.build(parallel)
    (model,) = build_model_chunks(tiny_model(**model_changes), parallel, ps, SEED)
    return model, ps


def _tp_worker(rank: int, world: int, sequence_parallel: bool) -> bool:
    torch.manual_seed(rank)  # the engine must not depend on the global RNG
    model, ps = _build(ParallelConfig(tp=2, sequence_parallel=sequence_parallel))
    single = single_model()
    stop = [stop_token_for(single, PROMPTS[0], 3, MAX_NEW)]
    out = _engine(model, ps, stop).generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)
    assert out.responses() == [greedy_reference(single, p, MAX_NEW, stop) for p in PROMPTS for _ in range(2)]
    for params in SAMPLING:  # vocab-parallel sampling draws exactly what one process draws
        par = _engine(model, ps, stop).generate(PROMPTS, n=2, sampling=params, max_new_tokens=MAX_NEW)
        ref = _engine(single, ParallelState.single(), stop).generate(PROMPTS, n=2, sampling=params, max_new_tokens=MAX_NEW)
        assert par.responses() == ref.responses()
        _assert_rel(par.log_probs_BS, ref.log_probs_BS, ref.response_mask_BS)
    assert ps.sequence_parallel == sequence_parallel  # restored after generation
    return True


def _tp_replicated_kv_worker(rank: int, world: int) -> bool:
    """2 kv heads under tp=4: every rank keeps the full k/v weights and fuses the rows of its head."""
    model, ps = _build(ParallelConfig(tp=4))
    single = single_model()
    with pytest.warns(UserWarning, match="decoding eagerly, because the decode step of tp=4 runs collectives"):
        eng = _engine(model, ps, [], compile=True)  # falls back to eager decoding
    out = eng.generate(PROMPTS, n=1, sampling=GREEDY, max_new_tokens=MAX_NEW)
    assert out.responses() == [greedy_reference(single, p, MAX_NEW, []) for p in PROMPTS]
    _assert_rel(out.log_probs_BS, trainer_log_probs(single, out, ParallelState.single()), out.response_mask_BS)
    return True


def _ep_worker(rank: int, world: int) -> bool:
    model, ps = _build(ParallelConfig(ep=2))
    single = single_model()
    stop = [stop_token_for(single, PROMPTS[0], 2, MAX_NEW)]
    mine = local_prompts(PROMPTS + [[40, 41, 42]], ps)  # rank 0: 3 prompts, rank 1: 2
    budget = 2.5 * kv_bytes_per_slot(model) * (7 + MAX_NEW) / 2**20  # a few rows per chunk: ranks run unequal chunk counts
    out = _engine(model, ps, stop, kv_cache_budget_mb=budget).generate(mine, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)
    assert out.responses() == [greedy_reference(single, p, MAX_NEW, stop) for p in mine for _ in range(2)]
    sampled = _engine(model, ps, stop).generate(mine, n=2, sampling=SAMPLING[1], max_new_tokens=MAX_NEW + rank * 4)
    _assert_rel(sampled.log_probs_BS, trainer_log_probs(model, sampled, ps, SAMPLING[1].temperature), sampled.response_mask_BS)
    return True


def _pp_worker(rank: int, world: int) -> bool:
    parallel = ParallelConfig(pp=2)
    model, ps = _build(parallel)
    (critic,) = build_model_chunks(tiny_model(value_head=True), parallel, ps, SEED)
    single, single_critic = single_model(), single_model(value_head=True)
    stop = [stop_token_for(single, PROMPTS[0], 3, MAX_NEW)]
    for params in (GREEDY, SAMPLING[1]):
        par = RolloutEngine([model], ps, RolloutConfig(), stop_ids=stop, pad_id=0, seed=5, critic=[critic])
        ref = RolloutEngine(single, ParallelState.single(), RolloutConfig(), stop_ids=stop, pad_id=0, seed=5, critic=single_critic)
        a = par.generate(PROMPTS, n=2, sampling=params, max_new_tokens=MAX_NEW)
        b = ref.generate(PROMPTS, n=2, sampling=params, max_new_tokens=MAX_NEW)
        assert a.responses() == b.responses() and a.finish_reasons == b.finish_reasons
        _assert_rel(a.log_probs_BS, b.log_probs_BS, b.response_mask_BS)
        assert_close_rel(a.values_BS, b.values_BS, 1e-5, "values")
    budget = 2 * 2.5 * kv_bytes_per_slot(model) * (7 + MAX_NEW) / 2**20  # 2 micro-batch slots, few rows each: slots refill
    small = RolloutEngine([model], ps, RolloutConfig(kv_cache_budget_mb=budget), stop_ids=stop, pad_id=0)
    assert len(small._plan_chunks([p for p in PROMPTS for _ in range(2)], MAX_NEW)) > 2
    out = small.generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)
    assert out.responses() == [greedy_reference(single, p, MAX_NEW, stop) for p in PROMPTS for _ in range(2)]
    return True


def _mixed_worker(rank: int, world: int, layout: dict) -> bool:
    """tp or pp combined with ep spanning dp ranks: unequal work, lockstep and greedy == reference."""
    parallel = ParallelConfig(**layout)
    ps = ParallelState.build(parallel)
    (model,) = build_model_chunks(tiny_model(), parallel, ps, SEED)
    single = single_model()
    stop = [stop_token_for(single, PROMPTS[0], 2, MAX_NEW)]
    mine = local_prompts(PROMPTS + [[40, 41, 42]], ps)
    out = _engine(model, ps, stop).generate(mine, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW + 3 * ps.dp_rank)
    assert out.responses() == [greedy_reference(single, p, MAX_NEW + 3 * ps.dp_rank, stop) for p in mine for _ in range(2)]
    return True


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_equals_single_process(sequence_parallel):
    assert run_distributed(_tp_worker, 2, sequence_parallel) == [True, True]


@pytest.mark.timeout(240)
def test_tp4_with_replicated_kv_heads_equals_single_process():
    assert run_distributed(_tp_replicated_kv_worker, 4) == [True] * 4


@pytest.mark.timeout(240)
def test_ep2_ranks_with_unequal_work_stay_in_lockstep():
    assert run_distributed(_ep_worker, 2) == [True, True]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [{"pp": 2, "ep": 2}, {"tp": 2, "ep": 4}])
def test_four_ranks_tp_or_pp_with_ep_across_dp(layout):
    assert run_distributed(_mixed_worker, 4, layout) == [True] * 4


@pytest.mark.timeout(240)
def test_pp2_with_critic_equals_single_process():
    assert run_distributed(_pp_worker, 2) == [True, True]
