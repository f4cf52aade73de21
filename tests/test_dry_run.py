"""The memory-free dry run: every rank of small layouts passes every phase (PPO included); planted
device and shape errors fail naming what and where; the CLI runs it and refuses bad input."""
import dataclasses
import subprocess
import sys

import pytest
import torch

import megatron_seed.train.trainer as trainer_module
from megatron_seed.config import ConfigError, ParallelConfig
from megatron_seed.parallel.mappings import reduce_scalars
from megatron_seed.params import count_parameters
from megatron_seed.plan.dry_run import DryRunError, dry_run
from rl.dry_run import PHASES as RL_PHASES
from tests.model_utils import tiny_config, tiny_model

LAYOUTS = {  # name: (world, parallel config, dp)
    "tp2": (2, {"tp": 2}, 1),
    "pp2": (2, {"pp": 2}, 1),
    "ep2_dp2": (4, {"ep": 2}, 4),
    "tp2_pp2_dp2": (8, {"tp": 2, "pp": 2}, 2),
}
PHASES = ("train", "rollout", "checkpoint", "ppo")


def layout_config(parallel: dict, dp: int = 1, precision: str = "fp32"):
    """A dense and an MoE layer (one per stage under pp=2); two micro-batches of two rows per rank in the
    LM step and in each PPO pass (the dry run's cost grows with the ops run, not their sizes)."""
    cfg = tiny_config(tiny_model(num_layers=2, num_dense_layers=1, dense_ffn_size=32), micro_batch_size=2,
                      global_batch_size=4 * dp, seq_len=16, precision=precision)
    cfg.parallel = dataclasses.replace(ParallelConfig(), **parallel)
    cfg.rollout.max_new_tokens = 4
    cfg.rl.prompts_per_step, cfg.rollout.samples_per_prompt = dp, 4
    return cfg


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_rank_passes_every_phase(name):
    world, parallel, dp = LAYOUTS[name]
    for rank in range(world):
        report = dry_run(layout_config(parallel, dp), world, rank, PHASES, RL_PHASES)
        assert list(report.phases) == ["build", *PHASES]
        assert report.off_device == [], f"rank {rank}: allocated off the device: {report.off_device[:3]}"
        peak = report.peak()
        assert 0 < peak["parameters"] and 0 < peak["gradients"] and 0 < peak["optimizer_states"] and 0 < peak["kv_cache"]
        build, train, ppo = report.phases["build"], report.phases["train"], report.phases["ppo"]
        assert train["total"] > build["total"] + train["gradients"]  # the step allocates more than the gradients
        # the actor and the critic: two models' weights, gradients and Adam states
        assert ppo["parameters"] > 1.5 * train["parameters"] and ppo["optimizer_states"] > 1.5 * train["optimizer_states"]


@pytest.mark.timeout(300)
def test_one_rank_memory_is_the_exact_parameter_bytes():
    """fp32 parameters: 4 bytes each of the preset's exact count; Adam: master + two moments (+ decay mask)
    in fp32; bf16 halves the parameters and gradients but not the optimizer."""
    cfg = layout_config({})
    n = count_parameters(cfg.model).total
    fp32 = dry_run(cfg, 1, 0, PHASES[:-1]).peak()
    assert fp32["parameters"] == 4 * n
    assert fp32["gradients"] == 4 * n
    assert fp32["optimizer_states"] == 4 * 4 * n
    bf16 = dry_run(layout_config({}, precision="bf16"), 1, 0, PHASES[:-1]).peak()
    assert bf16["parameters"] == 2 * n and bf16["gradients"] == 2 * n
    assert bf16["optimizer_states"] == fp32["optimizer_states"]


@pytest.mark.timeout(300)
def test_a_cpu_packet_handed_to_a_reduction_fails_naming_it(monkeypatch):
    """The statistic packet of the loss reduction is built on the CPU, as the code did before
    ParallelState.device: a real NCCL job fails at that collective, and so does the dry run."""

    def on_cpu(values, group, op=torch.distributed.ReduceOp.SUM, *, device):
        return reduce_scalars(values, group, op, device=torch.device("cpu"))

    monkeypatch.setattr(trainer_module, "reduce_scalars", on_cpu)
    with pytest.raises(DryRunError, match=r"all_reduce over a group of 2 got a tensor of shape \(2,\) on cpu.*train/trainer.py:\d+"):
        dry_run(layout_config({"pp": 2}), 2, 1, ("train",))


@pytest.mark.timeout(300)
def test_a_cpu_packet_in_the_ppo_step_fails_naming_it(monkeypatch):
    """PPO's statistics (mean lambda of the batch, rollout means) reduced over dp from a CPU packet: the
    dry run names rl/ppo.py."""
    import rl.ppo

    def on_cpu(values, group, op=torch.distributed.ReduceOp.SUM, *, device):
        return reduce_scalars(values, group, op, device=torch.device("cpu"))

    monkeypatch.setattr(rl.ppo, "reduce_scalars", on_cpu)
    with pytest.raises(DryRunError, match=r"all_reduce over a group of 2 got a tensor of shape \(\d+,\) on cpu.*rl/ppo.py:\d+"):
        dry_run(layout_config({}, dp=2), 2, 0, ("ppo",), RL_PHASES)


@pytest.mark.timeout(300)
def test_an_op_mixing_devices_fails_naming_the_module(monkeypatch):
    """Rotary tables built on the CPU meet the queries inside the attention module."""
    import megatron_seed.model.gpt as gpt

    real = gpt.rotary_cos_sin
    monkeypatch.setattr(gpt, "rotary_cos_sin", lambda pos, d, theta: real(pos.to("cpu"), d, theta))
    with pytest.raises(DryRunError, match=r"aten\.\w+.* in GPTModel\.layers\.0\.self_attn \(megatron_seed/model/layers\.py:\d+ <- .*\) mixes devices"):
        dry_run(layout_config({"tp": 2}), 2, 0, ("train",))


@pytest.mark.timeout(300)
def test_a_collective_of_mismatched_sizes_fails_naming_the_shapes():
    """A sequence of 15 under sequence parallel over tp=2: the reduce-scatter's shards differ
    (8 and 7 rows), which NCCL would refuse; the checking process group names both."""
    cfg = layout_config({"tp": 2, "sequence_parallel": True})
    cfg.train.seq_len = 15
    with pytest.raises(DryRunError, match=r"reduce_scatter over 2 ranks: output \(2, 8, 32\), inputs \[\(2, 8, 32\), \(2, 7, 32\)\]"):
        dry_run(cfg, 2, 0, ("train",))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_seed.cli", "dry-run", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_cli_prints_the_peaks_and_refuses_bad_ranks_and_layouts():
    tiny = ["--preset", "tiny", "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2", "--set", "train.seq_len=32",
            "--set", "rl.prompts_per_step=1", "--set", "rollout.samples_per_prompt=2", "--set", "rollout.max_new_tokens=8"]
    done = cli(*tiny, "--world-size", "2", "--rank", "1", "--set", "parallel.pp=2")
    assert done.returncode == 0, done.stderr
    assert "rank 1 of 2" in done.stdout and "optimizer_states" in done.stdout
    assert [line.split()[0] for line in done.stdout.splitlines()[3:8]] == ["build", "train", "rollout", "checkpoint", "ppo"]
    bad_rank = cli(*tiny, "--world-size", "2", "--rank", "2")
    assert bad_rank.returncode == 2 and "--rank 2: must be in [0, 2)" in bad_rank.stderr
    bad_layout = cli(*tiny, "--world-size", "3", "--set", "parallel.tp=2")
    assert bad_layout.returncode == 2 and "world size 3 is not divisible by tp*cp*pp" in bad_layout.stderr


def test_unknown_phase_is_refused():
    with pytest.raises(ConfigError, match="unknown"):
        dry_run(layout_config({}), 1, 0, ("prefil",))
