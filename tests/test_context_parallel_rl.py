"""The PPO step under context parallelism equals one process.

cp=2 cuts every sequence of the rollout batch (padded to a multiple of 4) over two
ranks: the behaviour, reference and critic forwards come back whole for GAE, the actor
loss (clip-higher PPO, positive-example NLL, KL, entropy) and the value loss see each
rank's tokens with one global normaliser, and every updated actor and critic weight
and the global metrics match the single-process step (rel 1e-5).
"""
import pytest

from megatron_seed.parallel.spawn import run_distributed
from tests.numerics import rel_err
from tests.test_rl_ppo import ppo_run


@pytest.mark.timeout(300)
def test_ppo_step_under_cp2_equals_single_process():
    single = ppo_run(0, 1, {})
    out = run_distributed(ppo_run, 2, {"cp": 2})
    for model in ("actor", "critic"):
        for rank_out in out:
            for name, ref in single[model].items():
                assert rel_err(rank_out[model][name], ref) <= 1e-5, (model, name)
    for rank_out in out:
        for key in ("actor/tokens", "actor/sequences", "actor/positive_tokens", "critic/tokens", "actor/pg_loss", "actor/lm_loss", "actor/entropy", "actor/kl_ref", "actor/grad_norm", "critic/value_loss",
                    "critic/grad_norm", "critic/explained_variance", "critic/explained_variance_before", "rollout/reward_mean"):
            assert rank_out["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-7), key


def rollout_worker(rank: int, world: int) -> bool:
    """Prefill cut over cp=2 (left-padded prompts of uneven lengths), decode replicated: same rollouts as one process."""
    import torch

    from megatron_seed.config import ParallelConfig, RolloutConfig
    from megatron_seed.model.build import build_model_chunks
    from megatron_seed.parallel.state import ParallelState
    from rl.rollout.engine import RolloutEngine
    from rl.rollout.sampling import SamplingParams
    from tests.model_utils import tiny_model
    from tests.rollout_utils import PROMPTS, SEED, single_model, stop_token_for

    parallel = ParallelConfig(cp=2)
    ps = ParallelState.build(parallel)
    (model,) = build_model_chunks(tiny_model(), parallel, ps, SEED)
    (critic,) = build_model_chunks(tiny_model(value_head=True), parallel, ps, SEED)
    single, single_critic = single_model(), single_model(value_head=True)
    stop = [stop_token_for(single, PROMPTS[0], 3, 8)]
    prompts = PROMPTS + [list(range(1, 30))]  # 29 tokens: the prefill spans every chunk of both ranks
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9, top_k=20)):
        a = RolloutEngine(model, ps, RolloutConfig(), stop_ids=stop, pad_id=0, seed=5, critic=critic).generate(
            prompts, n=2, sampling=params, max_new_tokens=8)
        b = RolloutEngine(single, ParallelState.single(), RolloutConfig(), stop_ids=stop, pad_id=0, seed=5,
                          critic=single_critic).generate(prompts, n=2, sampling=params, max_new_tokens=8)
        assert a.responses() == b.responses() and a.finish_reasons == b.finish_reasons
        mask = b.response_mask_BS
        assert float(((a.log_probs_BS - b.log_probs_BS)[mask]).norm() / b.log_probs_BS[mask].norm()) <= 1e-5
        assert float(((a.values_BS - b.values_BS)[mask]).norm() / b.values_BS[mask].norm()) <= 1e-5
        assert not torch.equal(a.values_BS[mask], torch.zeros_like(a.values_BS[mask]))
    return True


@pytest.mark.timeout(300)
def test_rollout_with_cp2_prefill_equals_single_process():
    assert run_distributed(rollout_worker, 2) == [True, True]
