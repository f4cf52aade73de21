"""RLTrainer: parallel layouts equal one process through the production prompt sharding; the phases run
SFT -> value pretraining -> PPO, SFT trains the actor, seeds the critic and resumes mid-phase exactly;
logged values show every recipe knob reaching its loss; a crashing scorer does not stop the run."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from data.tokenizer import load_tokenizer
from megatron_seed.config import ConfigError
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.train.checkpoint import CheckpointError
from megatron_seed.parallel.state import ParallelState
from rl.rl_trainer import RLTrainer
from tests.numerics import assert_close_rel
from tests.rl_trainer_utils import ParityRouter, PayEverything, math_records, tiny_rl_config

pytestmark = pytest.mark.usefixtures("one_thread")


def build(cfg, ps=None, router=None, records=None, held_out=None) -> RLTrainer:
    ps = ps or ParallelState.single()
    return RLTrainer(cfg, ps, load_tokenizer(cfg.data.tokenizer), records or math_records(), router or ParityRouter(), held_out)


def read_jsonl(path) -> list:
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------- parallel equals serial


def first_ppo_step(rank: int, world: int, save_dir: str, parallel: list) -> dict:
    """Every optimizer update of the first PPO step: actor and critic loss and grad norm."""
    # greedy: the same rollouts under every layout; 2-row micro-batches on every layout, as MoE balancing sees micro-batches;
    # a larger Adam eps keeps the later updates from dividing fp32 rounding by near-zero second moments (as in test_rl_ppo)
    cfg = tiny_rl_config(save_dir, "rollout.temperature=0", "train.micro_batch_size=2", "train.adam_eps=1e-4", *parallel)
    ps = ParallelState.build(cfg.parallel, world, rank) if world > 1 else ParallelState.single()
    rl = build(cfg, ps)
    rl.start_ppo()
    metrics = rl.step()
    updates = [{f"{role}/{k}": u[role][k] for role in ("actor", "critic") for k in ("loss", "grad_norm")} for u in rl.ppo.updates]
    return {"updates": updates, "reward": metrics["rollout/reward_mean"], "length": metrics["rollout/response_length"]}


@pytest.fixture(scope="module")
def serial_first_step(tmp_path_factory):
    return first_ppo_step(0, 1, str(tmp_path_factory.mktemp("serial")), [])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("parallel", [["parallel.dp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.ep=2"]],
                         ids=["dp2", "tp2", "ep2"])
def test_first_ppo_step_equals_one_process(parallel, serial_first_step, tmp_path):
    want = serial_first_step
    results = run_distributed(first_ppo_step, 2, str(tmp_path), parallel)
    assert len(want["updates"]) == 4  # 2 epochs x 2 mini-batches
    for got in results:
        assert got["reward"] == want["reward"] and got["length"] == want["length"]  # the same rollouts
        for g, w in zip(got["updates"], want["updates"]):
            for key, value in w.items():
                assert abs(g[key] - value) <= 1e-5 * abs(value), (key, g[key], value)


def test_prompts_per_step_must_split_over_dp(tmp_path):
    cfg = tiny_rl_config(tmp_path, "rl.prompts_per_step=3", "rl.mini_batches=1")
    single = ParallelState.single()
    ps = dataclasses.replace(single, layout=dataclasses.replace(single.layout, world=2, dp=2))  # checked before any group is used
    with pytest.raises(ConfigError, match="rl.prompts_per_step=3 is not divisible by dp=2"):
        build(cfg, ps)


# ----------------------------------------------------------------------------- phases

# SFT on short generated worked solutions: 4-row global batches of 256 tokens
SFT = ["sft.examples=24", "sft.warmup_steps=1", "train.global_batch_size=4", "data.task_families=[largest]", "data.task_difficulty=[1,1]"]


class StopAtSFTStep(RLTrainer):
    """Stops (as Ctrl-C does) once the SFT phase has done ``stop_at`` steps."""

    stop_at = 2

    def stop_requested(self) -> bool:
        self._stop = self._stop or self.phases[0].step >= self.stop_at
        return super().stop_requested()


def weights(chunks) -> dict:
    return {k: v.clone() for k, v in chunks[0].state_dict().items()}


@pytest.mark.timeout(300)
def test_sft_comes_first_trains_the_actor_seeds_the_critic_and_resumes_mid_phase(tmp_path):
    cfg = tiny_rl_config(tmp_path / "whole", "sft.steps=4", "rl.steps=0", "train.save_interval=2", *SFT)
    whole = build(cfg)
    initial = weights(whole.actor.chunks)
    assert not whole.fit()["stopped"]
    records = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert [(r["phase"], r["step"]) for r in records] == [("sft", s) for s in (1, 2, 3, 4)]
    actor, critic = weights(whole.actor.chunks), weights(whole.critic.chunks)
    assert any(not torch.equal(initial[k], v) for k, v in actor.items())  # SFT trained the actor's own weights
    shared = [k for k in critic if k in actor and not k.startswith("value_head.")]
    assert shared and all(torch.equal(critic[k], actor[k]) for k in shared)  # the critic starts from the SFT policy
    master = [b.master.clone() for b in whole.actor.optimizer.buckets]
    whole.actor.optimizer.sync_master_from_params()  # changes nothing: the master copy already is the SFT weights
    assert all(torch.equal(m, b.master) for m, b in zip(master, whole.actor.optimizer.buckets))

    # stopped after SFT step 2, then resumed in a new trainer: steps 3 and 4 are the uninterrupted run's
    cut = tiny_rl_config(tmp_path / "cut", "sft.steps=4", "rl.steps=0", "train.save_interval=2", *SFT)
    stopped = StopAtSFTStep(cut, ParallelState.single(), load_tokenizer(cut.data.tokenizer), math_records(), ParityRouter())
    assert stopped.fit()["stopped"] and stopped.phases[0].step == 2
    resumed = build(cut)
    assert resumed.resume() and resumed.phases[0].step == 2 and not resumed.phases[0].done
    assert not resumed.fit()["stopped"]
    got = {r["step"]: r for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")}
    want = {r["step"]: r for r in records}
    for step in (3, 4):
        for key in ("sft/loss", "sft/grad_norm", "sft/lr"):
            assert_close_rel(got[step][key], want[step][key], 1e-6, f"{key} at step {step}")
    for k, v in weights(resumed.actor.chunks).items():
        assert_close_rel(v, actor[k], 1e-6, k)


class ScriptedValidation:
    """Stands in for the SFT phase's validator: reports the given greedy accuracies in turn."""

    def __init__(self, accuracies):
        self.accuracies = list(accuracies)

    def evaluate(self):
        return dataclasses.make_dataclass("Report", ["overall_greedy_acc"])(self.accuracies.pop(0))


@pytest.mark.timeout(300)
def test_sft_stops_at_the_validation_accuracy_target_on_prompts_it_does_not_train_on(tmp_path, monkeypatch):
    import rl.sft_phase
    from data.tasks import generate_prompts

    excluded = []
    real = rl.sft_phase.sft_conversations
    monkeypatch.setattr(rl.sft_phase, "sft_conversations", lambda cfg, prompts: excluded.extend(prompts) or real(cfg, prompts))
    target = ["sft.stop_accuracy=0.5", "sft.eval_interval=2", "sft.eval_prompts=3"]
    cfg = tiny_rl_config(tmp_path / "real", "sft.steps=4", "rl.steps=0", *SFT, *target)
    sft_prompts = generate_prompts(24, seed=cfg.train.seed + 2, families=["largest"], difficulty=(1, 1))  # SFT's own problems
    real_run = build(cfg, records=sft_prompts, held_out=generate_prompts(2, seed=99, families=["largest"], difficulty=(1, 1)))
    validation = [r.prompt for r in real_run.phases[0].validator.records]
    assert validation == [r.prompt for r in sft_prompts[:3]] and set(validation) <= set(excluded)  # SFT leaves them out
    assert not set(validation) & {r.prompt for r in real_run.evaluator.records}  # and they are not the held-out prompts
    assert not real_run.fit()["stopped"]
    logged = [(r["step"], r.get("sft/val_greedy_acc")) for r in read_jsonl(tmp_path / "real" / "metrics.jsonl")]
    assert logged == [(1, None), (2, 0.0), (3, None), (4, 0.0)]  # a fresh model scores 0 against the ground truth: all steps

    cfg = tiny_rl_config(tmp_path / "scripted", "sft.steps=8", "rl.steps=0", *SFT, *target)
    scripted = build(cfg, records=sft_prompts)
    scripted.phases[0].validator = ScriptedValidation([0.1, 0.5])
    assert not scripted.fit()["stopped"] and scripted.phases[0].done and scripted.phases[0].step == 4  # stopped at the target
    assert [r["step"] for r in read_jsonl(tmp_path / "scripted" / "metrics.jsonl")] == [1, 2, 3, 4]
    actor, critic = weights(scripted.actor.chunks), weights(scripted.critic.chunks)
    assert all(torch.equal(critic[k], actor[k]) for k in critic if k in actor and not k.startswith("value_head."))  # SFT's end
    with pytest.raises(ConfigError, match=r"sft.stop_accuracy=1.5: must be in \(0, 1\]"):
        tiny_rl_config(tmp_path / "bad", "sft.stop_accuracy=1.5")


# ----------------------------------------------------------------------------- held-out evaluation


def test_held_out_evaluation_is_on_by_default():
    from megatron_seed.config import load_config

    assert load_config("rl-tiny", None, []).rl.eval_prompts >= 32


@pytest.mark.timeout(300)
def test_a_gamed_training_reward_does_not_raise_held_out_accuracy(tmp_path, capsys):
    """Every response is paid 1, none answers its held-out task: the evaluation, before PPO, every
    rl.eval_interval steps and at the end, scores 0 per domain, greedy and sampled."""
    from data.tasks import generate_prompts

    held_out = generate_prompts(4, seed=7, families=("arithmetic", "linear_equation"), difficulty=(1, 1))
    cfg = tiny_rl_config(tmp_path, "rl.steps=2", "rl.eval_interval=1", "rl.eval_samples=2")
    rl = build(cfg, router=PayEverything(), held_out=held_out)
    assert not rl.fit()["stopped"]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["ppo/rollout/reward_mean"] for r in records if "ppo/rollout/reward_mean" in r] == [1.0, 1.0]
    evals = [r for r in records if "ppo/eval/greedy_acc" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]  # before PPO, at step 1 (the interval), at the end
    domains = sorted({r.domain for r in held_out})
    for r in evals:
        for key in ["greedy_acc", "sampled_acc", "pass@2"] + [f"{d}/{m}" for d in domains for m in ("greedy_acc", "sampled_acc", "pass@2")]:
            assert r[f"ppo/eval/{key}"] == 0.0, key
    assert list(rl.evals) == ["before_ppo", "ppo_step_1", "after_ppo"]
    table = capsys.readouterr().out.split("plots: ")[-1]
    for row in domains + ["all"]:  # the final table: greedy before / after / gain, sampled accuracy and pass@k
        assert any(line.split()[:5] == [row, "0.0%", "0.0%", "+0.0", "0.0"] for line in table.splitlines()), (row, table)
    assert "pass@2" in table


# ----------------------------------------------------------------------------- zero-variance filter


def filtered_step(rank: int, world: int, save_dir: str) -> dict:
    """One PPO step with rl.filter_zero_variance on sampled rollouts; what the filter saw and did on this rank."""
    cfg = tiny_rl_config(save_dir, "rl.filter_zero_variance=true", *(["parallel.dp=2"] if world > 1 else []))
    rl = build(cfg, ParallelState.build(cfg.parallel, world, rank) if world > 1 else None)
    seen = []
    ppo_step = rl.ppo.step
    rl.ppo.step = lambda batch, *args: seen.append(batch) or ppo_step(batch, *args)
    rl.start_ppo()
    metrics = rl.step()
    (batch,) = seen
    rewards_GN = batch["rewards_B"].view(-1, cfg.rollout.samples_per_prompt)
    varied_G = rewards_GN.max(dim=1).values > rewards_GN.min(dim=1).values
    first_epoch = rl.ppo.updates[:cfg.rl.mini_batches]
    return {"metrics": metrics, "varied": varied_G.tolist(), "trained": batch["trained_B"].tolist(),
            "kept_tokens": int(batch["mask_BS"][batch["trained_B"]].sum()), "trained_tokens": sum(u["actor"]["tokens"] for u in first_epoch)}


@pytest.mark.timeout(300)
def test_zero_variance_filter_drops_exactly_the_constant_groups(tmp_path):
    got = filtered_step(0, 1, str(tmp_path))
    varied, n = got["varied"], 2
    assert 0 < sum(varied) < len(varied), varied  # the seed gives both kinds of group
    assert got["trained"] == [v for v in varied for _ in range(n)]
    assert (got["metrics"]["rollout/groups_kept"], got["metrics"]["rollout/groups_dropped"]) == (sum(varied), len(varied) - sum(varied))
    assert got["trained_tokens"] == got["kept_tokens"]  # the update's normaliser counts the kept groups' tokens only


@pytest.mark.timeout(300)
def test_zero_variance_filter_counts_groups_over_dp(tmp_path):
    ranks = run_distributed(filtered_step, 2, str(tmp_path))
    kept = sum(sum(r["varied"]) for r in ranks)  # each dp rank scored its own 2 of the 4 prompts
    for r in ranks:
        assert (r["metrics"]["rollout/groups_kept"], r["metrics"]["rollout/groups_dropped"]) == (kept, 4 - kept)
        assert r["trained"] == [v for v in r["varied"] for _ in range(2)]
    assert ranks[0]["trained_tokens"] == ranks[1]["trained_tokens"] == sum(r["kept_tokens"] for r in ranks)


@pytest.mark.timeout(300)
def test_a_step_whose_groups_are_all_constant_skips_the_update_and_says_so(tmp_path, capsys):
    rl = build(tiny_rl_config(tmp_path, "rl.filter_zero_variance=true", "rl.steps=2"), router=PayEverything())
    actor, critic = weights(rl.actor.chunks), weights(rl.critic.chunks)
    assert not rl.fit()["stopped"]
    assert capsys.readouterr().out.count("every one of the 4 groups has equal rewards (rl.filter_zero_variance): no update this step") == 2
    ppo = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["phase"] == "ppo"]
    assert [r["step"] for r in ppo] == [1, 2]
    for r in ppo:
        assert (r["ppo/rollout/groups_kept"], r["ppo/rollout/groups_dropped"], r["ppo/rollout/reward_mean"]) == (0, 4, 1.0)
        assert "ppo/actor/loss" not in r
    assert rl.actor.step == rl.critic.step == 0
    assert all(torch.equal(v, actor[k]) for k, v in weights(rl.actor.chunks).items())
    assert all(torch.equal(v, critic[k]) for k, v in weights(rl.critic.chunks).items())


# ----------------------------------------------------------------------------- logged values


@pytest.mark.timeout(300)
def test_value_pretraining_precedes_ppo_and_reports_explained_variance(tmp_path):
    cfg = tiny_rl_config(tmp_path, "sft.steps=1", *SFT, "rl.value_pretrain_steps=2", "rl.value_pretrain_patience=5", "rl.steps=1")
    result = build(cfg).fit()
    assert not result["stopped"]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    phases = [r["phase"] for r in records]
    assert phases == ["sft", "value_pretrain", "value_pretrain", "ppo"]
    assert [r["step"] for r in records] == [1, 1, 2, 1]  # each phase counts its own steps
    records = records[1:]
    for r in records[:2]:
        ev = r["value_pretrain/explained_variance"]
        assert ev is not None and math.isfinite(ev) and ev <= 1
    assert "ppo/critic/explained_variance" in records[2] and "ppo/rollout/lambda_policy" in records[2]
    assert (tmp_path / "rl_curves.png").stat().st_size > 0
    assert any((tmp_path / "tensorboard").iterdir())


def one_step(tmp_path, *overrides: str) -> tuple:
    rl = build(tiny_rl_config(tmp_path, *overrides))
    rl.start_ppo()
    return rl.step(), rl.ppo.updates


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return one_step(tmp_path_factory.mktemp("base"), "rl.length_adaptive=false")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("override, governs", [
    ("rl.lambda_value=0.5", "critic/returns"),
    ("rl.lambda_policy=0.5", "actor/grad_norm"),
    ("rl.eps_high=0.01", "actor/clip_frac_high"),
    ("rl.eps_low=0.01", "actor/clip_frac_low"),
])
def test_recipe_settings_reach_the_loss(override, governs, baseline, tmp_path):
    base, _ = baseline
    changed, _ = one_step(tmp_path, "rl.length_adaptive=false", override)
    assert changed[governs] != pytest.approx(base[governs], rel=1e-6, abs=1e-9), (override, governs)
    # what the setting does not govern is unchanged: the same rollouts
    assert changed["rollout/reward_mean"] == base["rollout/reward_mean"]


@pytest.mark.timeout(300)
def test_rl_warmup_steps_ramp_the_actor_and_critic_learning_rates(tmp_path):
    _, updates = one_step(tmp_path, "rl.warmup_steps=8", "rl.actor_lr=1e-3", "rl.critic_lr=2e-3")
    assert len(updates) == 4  # 2 epochs x 2 mini-batches: the first 4 of 8 warm-up steps
    for role, lr in (("actor", 1e-3), ("critic", 2e-3)):
        assert [u[role]["lr"] for u in updates] == pytest.approx([lr * k / 8 for k in (1, 2, 3, 4)], rel=1e-9)


@pytest.mark.timeout(300)
def test_length_alpha_sets_lambda_policy(tmp_path):
    short, _ = one_step(tmp_path / "a", "rl.length_adaptive=true", "rl.length_alpha=0.5")
    long, _ = one_step(tmp_path / "b", "rl.length_adaptive=true", "rl.length_alpha=5.0")
    length = short["rollout/response_length"]
    assert short["rollout/lambda_policy"] < long["rollout/lambda_policy"] <= 1
    assert long["rollout/lambda_policy"] > 1 - 1 / (5.0 * 1.0) - 1e-9 and length >= 1


@pytest.mark.timeout(300)
def test_lm_loss_coef_adds_the_positive_example_loss(baseline, tmp_path):
    _, base_updates = baseline
    _, updates = one_step(tmp_path, "rl.length_adaptive=false", "rl.lm_loss_coef=0.5")
    first, base_first = updates[0]["actor"], base_updates[0]["actor"]
    mu_base = 0.1  # tests/rl_trainer_utils.py pins rl.lm_loss_coef at the value these tests were written against
    # the first update has ratio 1, so the policy term is the same and the loss moves by (mu - mu_base) x NLL of positives
    assert first["loss"] - base_first["loss"] == pytest.approx((0.5 - mu_base) * first["lm_loss"], rel=1e-5)
    assert first["lm_loss"] > 0


# ----------------------------------------------------------------------------- robustness


class CrashOnSecond(ParityRouter):
    """The reward router with a scorer that raises on one sample of every batch."""

    def __init__(self):
        from rl.rewards.router import RewardRouter, RouterConfig

        parity = self

        class Flaky:
            calls = 0

            def score(self, sample):
                Flaky.calls += 1
                if Flaky.calls % 8 == 2:
                    raise RuntimeError("scorer bug")
                return ParityRouter.score_batch(parity, [sample])[0]

            def score_batch(self, samples):
                return [self.score(s) for s in samples]

        self.router = RewardRouter({"math": Flaky()}, RouterConfig(workers=1, progress=False))

    def score_batch(self, samples):
        return self.router.score_batch(samples)


@pytest.mark.timeout(300)
def test_a_scorer_that_raises_on_one_sample_does_not_stop_the_run(tmp_path):
    cfg = tiny_rl_config(tmp_path, "rl.steps=2", "rl.log_samples_interval=1")
    result = build(cfg, router=CrashOnSecond()).fit()
    assert not result["stopped"]
    ppo = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["phase"] == "ppo"]
    assert [r["step"] for r in ppo] == [1, 2]
    for r in ppo:  # each step had one failing sample: scored 0, left out of the loss, counted
        assert r["ppo/reward/scoring_error"] == 1 and r["ppo/reward/masked"] == 1


class CrashOnEvery(CrashOnSecond):
    """The reward router with a scorer that raises on every sample (a broken judge, a dead sandbox)."""

    def __init__(self):
        from rl.rewards.router import RewardRouter, RouterConfig

        class Broken:
            def score_batch(self, samples):
                raise RuntimeError("scorer down")

        self.router = RewardRouter({"math": Broken()}, RouterConfig(workers=1, progress=False))


@pytest.mark.timeout(300)
def test_a_step_whose_every_score_failed_makes_no_update_and_the_run_goes_on(tmp_path, capsys):
    cfg = tiny_rl_config(tmp_path, "rl.steps=2", "rl.value_pretrain_steps=1", "rl.eval_prompts=0")
    trainer = build(cfg, router=CrashOnEvery())
    before = [p.detach().clone() for p in trainer.actor.chunks[0].parameters()]
    assert not trainer.fit()["stopped"]
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.actor.chunks[0].parameters()))
    ppo = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["phase"] == "ppo" and "ppo/reward/masked" in r]
    assert [r["step"] for r in ppo] == [1, 2] and all(r["ppo/reward/masked"] == r["ppo/reward/scoring_error"] > 0 for r in ppo)
    assert "every sample's scoring failed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a kill between the critic's and the actor's save


def test_resume_after_a_kill_between_the_critic_and_actor_saves_takes_the_matching_critic(tmp_path):
    cfg = tiny_rl_config(tmp_path, "rl.steps=2", "train.save_interval=1")
    run = build(cfg)
    assert not run.fit()["stopped"]
    saved = weights(run.critic.chunks)
    # the kill's window: the critic of the next save is written, the actor's is not
    with torch.no_grad():
        for p in run.critic.chunks[0].parameters():
            p.add_(1.0)
    run.critic.step += 1
    run.critic.save({"actor_step": run.actor.step + 2})
    resumed = build(cfg)
    assert resumed.resume() and resumed.actor.step == run.actor.step
    for k, v in weights(resumed.critic.chunks).items():
        assert torch.equal(v, saved[k]), k  # the critic saved with the actor's latest, not the one ahead of it

    # no critic checkpoint of the actor's step at all: refused, naming the directory
    for d in (tmp_path / "critic").iterdir():
        if d.name.startswith("iter_") and d.name != f"iter_{run.critic.step:07d}":
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    with pytest.raises(CheckpointError, match="no checkpoint belongs to actor step"):
        build(cfg).resume()
