"""Mismatch metrics (rl.mismatch) on real PPO steps: exactly 0 when the rollout's log-probs are training's own, the
planted difference when one is perturbed, and logged on every step of an RL run with the native engine; a run with
routing replay resumes exactly."""
from __future__ import annotations

import json

import pytest
import torch

from data.tokenizer import load_tokenizer
from megatron_seed.config import ConfigError
from megatron_seed.parallel.state import ParallelState
from rl.experience import dp_shard
from rl.rl_trainer import RLTrainer
from tests.rl_trainer_utils import ParityRouter, math_records, tiny_rl_config
from tests.test_rl_ppo import build, ppo_config, synthetic_rollouts

pytestmark = pytest.mark.usefixtures("one_thread")

LOGP_KEYS = ("mismatch/logp_abs_diff_mean", "mismatch/logp_abs_diff_max", "mismatch/logp_frac_above_1e-3",
             "mismatch/seq_log_ratio_std", "mismatch/seq_log_ratio_abs_max")


def rollout_batch_with_training_logprobs(ppo) -> dict:
    """The synthetic rollouts with ``old_logprobs_BS`` set to the actor's own forward: rollout and training agree exactly."""
    batch = dp_shard(synthetic_rollouts(), 0, 1, ppo.cfg.mini_batches)
    batch["old_logprobs_BS"] = ppo.policy_logprobs(batch).detach().clone()
    return batch


@pytest.mark.timeout(120)
def test_mismatch_is_zero_when_rollout_and_training_agree_and_the_planted_difference_otherwise():
    cfg = ppo_config({}, kl_coef=0.0, ppo_epochs=1)
    ppo = build(cfg, ParallelState.single())
    batch = rollout_batch_with_training_logprobs(ppo)
    exact = ppo.prepare(dict(batch))[1]
    for key in LOGP_KEYS:
        assert exact[key] == 0.0, key

    mask_BS = batch["mask_BS"]
    b, s = [int(i) for i in torch.nonzero(mask_BS)[3]]
    planted = dict(batch, old_logprobs_BS=batch["old_logprobs_BS"].clone())
    planted["old_logprobs_BS"][b, s] -= 0.5  # the rollout claims a lower log-prob on one response token
    planted["old_logprobs_BS"][~mask_BS] += 7.0  # padding and prompt positions are not response tokens: never counted
    got = ppo.step(planted)
    tokens, rows = int(mask_BS.sum()), int(mask_BS.any(dim=1).sum())
    assert got["mismatch/logp_abs_diff_max"] == pytest.approx(0.5, rel=1e-6)
    assert got["mismatch/logp_abs_diff_mean"] == pytest.approx(0.5 / tokens, rel=1e-6)
    assert got["mismatch/logp_frac_above_1e-3"] == pytest.approx(1 / tokens)
    assert got["mismatch/seq_log_ratio_abs_max"] == pytest.approx(0.5, rel=1e-6)  # log r_b = +0.5 on row b, 0 elsewhere
    assert got["mismatch/seq_log_ratio_std"] == pytest.approx((0.25 / rows - (0.5 / rows) ** 2) ** 0.5, rel=1e-6)


@pytest.mark.timeout(300)
def test_an_rl_run_logs_the_mismatch_metrics_every_step(tmp_path):
    cfg = tiny_rl_config(tmp_path, "rl.steps=2", "rl.eval_prompts=0")
    RLTrainer(cfg, ParallelState.single(), load_tokenizer(cfg.data.tokenizer), math_records(), ParityRouter()).fit()
    ppo = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["phase"] == "ppo" and "ppo/actor/loss" in r]
    assert [r["step"] for r in ppo] == [1, 2]
    for r in ppo:
        # fp32 eager rollout (one batch of 8 rows) against training's micro-batches of 4: rounding only
        assert 0.0 <= r["ppo/mismatch/logp_abs_diff_mean"] <= r["ppo/mismatch/logp_abs_diff_max"] < 1e-4, r
        assert r["ppo/mismatch/logp_frac_above_1e-3"] == 0.0
        # the rollout recorded every response token's experts, and training's router picks the same ones
        assert r["ppo/mismatch/route_diff_layer0"] == r["ppo/mismatch/route_diff_layer1"] == r["ppo/mismatch/route_diff_mean"] == 0.0


@pytest.mark.timeout(300)
def test_mismatch_interval_measures_every_kth_step_and_skips_the_extra_forward_between(tmp_path):
    """rl.mismatch_interval=2 over 3 steps: measured at the first and the third; the second step runs no actor forward
    beyond its updates (the fp32 rollout's log-probs are kept, so nothing else needs one); a negative interval is refused."""
    cfg = tiny_rl_config(tmp_path, "rl.steps=3", "rl.eval_prompts=0", "rl.mismatch_interval=2")
    trainer = RLTrainer(cfg, ParallelState.single(), load_tokenizer(cfg.data.tokenizer), math_records(), ParityRouter())
    forwards = []
    measure = trainer.ppo.policy_logprobs

    def counted(batch, chunks=None, layout=None):
        if chunks is None:  # the actor's own forward (the reference passes its chunks)
            forwards[-1] += 1
        return measure(batch, chunks, layout)

    trainer.ppo.policy_logprobs = counted
    step = trainer.step

    def counted_step(**kwargs):
        forwards.append(0)
        return step(**kwargs)

    trainer.step = counted_step
    trainer.fit()
    assert forwards == [1, 0, 1]
    ppo = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["phase"] == "ppo" and "ppo/actor/loss" in r]
    assert [("ppo/mismatch/logp_abs_diff_mean" in r, "ppo/mismatch/route_diff_mean" in r) for r in ppo] == [(True, True), (False, False),
                                                                                                            (True, True)]
    with pytest.raises(ConfigError, match="rl.mismatch_interval"):
        tiny_rl_config(tmp_path / "bad", "rl.mismatch_interval=-1")


class StopAtPPOStep(RLTrainer):
    """Stops (as Ctrl-C does) once the PPO phase has done one step."""

    def stop_requested(self) -> bool:
        self._stop = self._stop or self.phases[-1].step >= 1
        return super().stop_requested()


@pytest.mark.timeout(300)
def test_a_run_with_routing_replay_resumes_exactly(tmp_path):
    """No rollout batch outlives a step (checkpoints hold the engine's generator instead), so a resumed step samples
    the same tokens and records the same routes: its replayed update equals the uninterrupted run's."""
    def run(name: str, cls=RLTrainer):
        cfg = tiny_rl_config(tmp_path / name, "rl.steps=2", "rl.eval_prompts=0", "rl.routing_replay=rollout", "train.save_interval=1")
        return cfg, cls(cfg, ParallelState.single(), load_tokenizer(cfg.data.tokenizer), math_records(), ParityRouter())

    run("whole")[1].fit()
    assert run("cut", StopAtPPOStep)[1].fit()["stopped"]
    resumed = run("cut")[1]
    assert resumed.resume() and resumed.phases[-1].step == 1
    assert not resumed.fit()["stopped"]
    step2 = [{r["step"]: r for r in map(json.loads, open(tmp_path / name / "metrics.jsonl")) if r["phase"] == "ppo"}[2]
             for name in ("whole", "cut")]
    for key in ("ppo/actor/loss", "ppo/actor/grad_norm", "ppo/mismatch/route_diff_mean", "ppo/mismatch/logp_abs_diff_mean"):
        assert step2[1][key] == pytest.approx(step2[0][key], rel=1e-6, abs=1e-9), key
