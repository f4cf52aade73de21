"""Packed, token-balanced PPO micro-batches (``train.max_tokens_per_micro_batch``, rl.packing).

A skewed rollout batch (one long sequence, many short ones) trains to the same actor and
critic weights packed as padded (rel 1e-5; a value-pretraining step likewise): in one process, over dp=2 (rows moved between
the ranks so their tokens balance within 10%, the same number of micro-batches on each)
and under cp=2 (packed rows whose documents cross the chunk boundaries). A sequence
longer than the budget, and packing with the per-row sequence mean, are refused naming
the field and the fix. The RL trainer with ``train.max_tokens_per_micro_batch`` set runs
value pretraining and PPO as the padded run does, and refuses a budget below a sequence.
"""
import dataclasses

import pytest
import torch

from megatron_seed.config import ConfigError, ParallelConfig, RLConfig
from megatron_seed.model.build import build_model_chunks
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer
from rl.experience import dp_shard, from_sequences
from rl.packing import karmarkar_karp
from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config
from tests.model_utils import tiny_config, tiny_model
from tests.numerics import assert_close_rel
from tests.test_rl_ppo import full_parameters

ROWS, MINI_BATCHES, BUDGET = 16, 2, 40
# mini-batch 0: one sequence of 39 tokens (prompt, response, bootstrap column) and seven of 6; mini-batch 1: short ones
RESPONSES = [37, 3, 2, 4, 3, 2, 4, 3, 2, 1, 2, 1, 2, 1, 1, 1]


def skewed_rollouts() -> dict:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (2 + b % 3,), generator=g).tolist() for b in range(ROWS)]
    responses = [torch.randint(1, 64, (n,), generator=g).tolist() for n in RESPONSES]
    rewards = [float(b % 3 == 0) for b in range(ROWS)]
    return from_sequences(prompts, responses, rewards, truncated=[b % 5 == 1 for b in range(ROWS)])


def ppo_trainer(parallel: dict, world: int, rank: int, max_tokens) -> PPOTrainer:
    # no aux loss: it is a per-micro-batch balancing statistic, so packing changes which tokens share it
    cfg = tiny_config(tiny_model(moe=dataclasses.replace(tiny_model().moe, aux_loss_coef=0.0)), micro_batch_size=2, adam_eps=1e-4,
                      max_tokens_per_micro_batch=max_tokens)
    cfg.parallel = dataclasses.replace(ParallelConfig(), **parallel)
    cfg.rl = RLConfig(ppo_epochs=1, mini_batches=MINI_BATCHES, actor_lr=1e-2, critic_lr=1e-2, lm_loss_coef=0.1, kl_coef=0.05,
                      entropy_coef=0.01)
    ps = ParallelState.build(cfg.parallel, world, rank)
    rows_per_update = ROWS // MINI_BATCHES
    actor = Trainer(rl_trainer_config(cfg, "actor", rows_per_update, ps.dp_size), ps)
    critic = Trainer(rl_trainer_config(cfg, "critic", rows_per_update, ps.dp_size), ps)
    init_critic_from_actor(critic, actor)
    return PPOTrainer(actor, critic, cfg.rl, reference=build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed),
                      bootstrap_truncated=True)


def ppo_step(parallel: dict, world: int, rank: int, max_tokens) -> dict:
    ppo = ppo_trainer(parallel, world, rank, max_tokens)
    metrics = ppo.step(dp_shard(skewed_rollouts(), ppo.ps.dp_rank, ppo.ps.dp_size, MINI_BATCHES))
    layout = ppo.layout
    return {"actor": full_parameters(ppo.actor), "critic": full_parameters(ppo.critic), "metrics": metrics,
            "micro_batches": None if layout is None else [len(m) for m in layout.mini_batches],
            "rank_tokens": None if layout is None else layout.rank_tokens, "width": None if layout is None else layout.width}


def assert_same_step(out: dict, want: dict) -> None:
    for model in ("actor", "critic"):
        for name, ref in want[model].items():
            assert_close_rel(out[model][name], ref, 1e-5, f"{model} {name}")
    for key in ("actor/tokens", "actor/sequences", "actor/positive_tokens", "actor/positive_sequences", "critic/tokens",
                "critic/sequences", "rollout/response_length"):
        assert out["metrics"][key] == want["metrics"][key], key
    for key in ("actor/pg_loss", "actor/lm_loss", "actor/kl_ref", "actor/entropy", "actor/grad_norm", "critic/value_loss",
                "critic/grad_norm", "critic/explained_variance_before"):
        assert out["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def padded():
    return ppo_step({}, 1, 0, None)


@pytest.mark.timeout(240)
def test_packed_ppo_step_equals_padded(padded):
    packed = ppo_step({}, 1, 0, BUDGET)
    assert_same_step(packed, padded)
    # the long row fills a micro-batch alone: mini-batch 0 takes three, mini-batch 1's short rows one
    assert packed["micro_batches"] == [3, 1] and packed["width"] == 39
    assert packed["metrics"]["packing/fill"] > 0.5


def _dp_and_cp_worker(rank: int, world: int) -> dict:
    return {"dp2": ppo_step({"dp": 2}, world, rank, BUDGET), "cp2": ppo_step({"cp": 2}, world, rank, BUDGET)}


@pytest.mark.timeout(300)
def test_packed_ppo_step_balanced_over_dp2_and_under_cp2_equals_padded(padded):
    out = run_distributed(_dp_and_cp_worker, 2)
    for rank_out in out:
        assert_same_step(rank_out["cp2"], padded)
        assert_same_step(rank_out["dp2"], padded)
    dp_ranks = [rank_out["dp2"] for rank_out in out]
    # the rank holding the long sequence alone gets an empty micro-batch: the other needs two for its 42 tokens
    assert dp_ranks[0]["micro_batches"] == dp_ranks[1]["micro_batches"] == [2, 1]
    tokens = dp_ranks[0]["rank_tokens"]
    assert max(tokens) / (sum(tokens) / 2) - 1 <= 0.10, tokens
    assert dp_ranks[0]["metrics"]["packing/dp_token_imbalance"] <= 0.10
    # without balancing, rank 0 would hold the long row and its mini-batch neighbours: far from balanced
    naive = [int(dp_shard(skewed_rollouts(), r, 2, MINI_BATCHES)["padding_mask_BS"].sum()) for r in range(2)]
    assert max(naive) / (sum(naive) / 2) - 1 > 0.10, naive


def critic_after_value_pretraining(max_tokens) -> dict:
    from rl.value_pretrain import value_pretrain_step

    ppo = ppo_trainer({}, 1, 0, max_tokens)
    metrics = value_pretrain_step(ppo.critic, skewed_rollouts(), ppo.cfg)
    return {"critic": full_parameters(ppo.critic), "metrics": metrics}


@pytest.mark.timeout(120)
def test_packed_value_pretraining_step_equals_padded():
    padded, packed = critic_after_value_pretraining(None), critic_after_value_pretraining(BUDGET)
    for name, ref in padded["critic"].items():
        assert_close_rel(packed["critic"][name], ref, 1e-5, name)
    assert packed["metrics"]["tokens"] == padded["metrics"]["tokens"] and packed["metrics"]["sequences"] == ROWS
    assert packed["metrics"]["value_loss"] == pytest.approx(padded["metrics"]["value_loss"], rel=1e-5)


def test_karmarkar_karp_one_long_many_short():
    lengths = [40] + [5] * 9
    parts = karmarkar_karp(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert sorted(sum(lengths[i] for i in p) for p in parts) == [40, 45]  # the optimum


@pytest.mark.timeout(120)
def test_sequence_longer_than_budget_is_refused():
    ppo = ppo_trainer({}, 1, 0, 24)
    with pytest.raises(ConfigError, match=r"train\.max_tokens_per_micro_batch=24: a sequence has 39 tokens.*fix: raise"):
        ppo.step(skewed_rollouts())


def test_packing_config_is_checked_at_load(tmp_path):
    from tests.rl_trainer_utils import tiny_rl_config

    assert tiny_rl_config(tmp_path, "train.max_tokens_per_micro_batch=512").train.max_tokens_per_micro_batch == 512
    with pytest.raises(ConfigError, match=r"train\.max_tokens_per_micro_batch=0.*positive"):
        tiny_rl_config(tmp_path, "train.max_tokens_per_micro_batch=0")
    with pytest.raises(ConfigError, match=r"rl\.loss_agg='sequence' with train\.max_tokens_per_micro_batch=512.*fix"):
        tiny_rl_config(tmp_path, "train.max_tokens_per_micro_batch=512", "rl.loss_agg=sequence")



def first_rl_steps(save_dir, *overrides: str) -> dict:
    """The tiny RL run's value-pretraining step and first PPO step: the logged records and every PPO update."""
    import json

    from data.tokenizer import load_tokenizer
    from rl.rl_trainer import RLTrainer
    from tests.rl_trainer_utils import ParityRouter, math_records, tiny_rl_config

    # greedy: both runs sample the same rollouts; no aux loss (a per-micro-batch statistic)
    cfg = tiny_rl_config(save_dir, "rollout.temperature=0", "train.micro_batch_size=2", "train.adam_eps=1e-4", "model.moe.aux_loss_coef=0",
                         "rl.value_pretrain_steps=1", "rl.ppo_epochs=1", "sft.steps=0", "rl.eval_prompts=0", *overrides)
    rl = RLTrainer(cfg, ParallelState.single(), load_tokenizer(cfg.data.tokenizer), math_records(), ParityRouter())
    rl.fit()
    records = [json.loads(line) for line in open(f"{save_dir}/metrics.jsonl")]
    updates = [{f"{role}/{k}": u[role][k] for role in ("actor", "critic") for k in ("loss", "grad_norm")} for u in rl.ppo.updates]
    return {"records": records, "updates": updates}


@pytest.mark.timeout(300)
def test_rl_trainer_with_packing_trains_as_padded(tmp_path):
    padded = first_rl_steps(tmp_path / "padded")
    packed = first_rl_steps(tmp_path / "packed", "train.max_tokens_per_micro_batch=256")
    assert [r["phase"] for r in packed["records"]] == ["value_pretrain", "ppo"]
    for key in ("value_pretrain/value_loss", "ppo/rollout/response_length", "ppo/critic/explained_variance_before"):
        assert packed["records"][0 if key.startswith("value") else 1][key] == pytest.approx(
            padded["records"][0 if key.startswith("value") else 1][key], rel=1e-5), key
    assert 0 < packed["records"][1]["ppo/packing/fill"] <= 1
    assert len(packed["updates"]) == len(padded["updates"]) == 2  # 2 mini-batches
    for got, want in zip(packed["updates"], padded["updates"]):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key
    with pytest.raises(ConfigError, match=r"train\.max_tokens_per_micro_batch=8: a sequence has \d+ tokens"):
        first_rl_steps(tmp_path / "too_small", "train.max_tokens_per_micro_batch=8")
