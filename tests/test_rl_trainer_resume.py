"""``megatron-seed rl`` killed with SIGKILL during PPO, then ``--resume``: the next steps equal an uninterrupted run's.

Real CLI processes (``python -m megatron_seed.cli rl``): the sampler, the rollout
engine's generator, both optimizers and the RNG must all come back from the checkpoint
for the rollouts and updates after the kill to be the same numbers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.rl_trainer_utils import TINY_RL

STEPS = 3
# sampled rollouts (temperature 1), the default scorers, a checkpoint after every step
RUN = TINY_RL + [f"rl.steps={STEPS}", "rl.value_pretrain_steps=1", "train.save_interval=1", "rollout.max_new_tokens=4"]
NOT_REPRODUCIBLE = ("time/", "tokens_per_s")  # wall-clock measurements


def cli(save_dir, *extra: str) -> list:
    argv = [sys.executable, "-m", "megatron_seed.cli", "rl"]
    for item in RUN + [f"train.save_dir={save_dir}"]:
        argv += ["--set", item]
    return argv + list(extra)


def environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def ppo_records(save_dir) -> dict:
    """``{step: record}`` of the PPO phase (a step written twice, before and after a resume, keeps the last)."""
    out = {}
    path = os.path.join(save_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    for line in open(path):
        if not line.endswith("\n"):  # still being written (or torn by the kill: the resumed run drops it)
            break
        record = json.loads(line)
        if record["phase"] == "ppo" and "ppo/rollout/reward_mean" in record:
            out[record["step"]] = record
    return out


@pytest.mark.timeout(900)
def test_sigkill_during_ppo_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cli(whole), env=environment(), check=True, timeout=600, capture_output=True)
    want = ppo_records(whole)
    assert sorted(want) == list(range(1, STEPS + 1))

    proc = subprocess.Popen(cli(killed), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while 1 not in ppo_records(killed):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert max(ppo_records(killed)) < STEPS  # it really died mid-run

    done = subprocess.run(cli(killed, "--resume"), env=environment(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    got = ppo_records(killed)
    for step in range(2, STEPS + 1):
        for key, value in want[step].items():
            if not any(part in key for part in NOT_REPRODUCIBLE):
                assert got[step][key] == (pytest.approx(value, rel=1e-6, abs=1e-12) if isinstance(value, float) else value), (step, key)



@pytest.mark.timeout(600)
def test_ctrl_c_saves_and_stops_then_resume_finishes_the_run(tmp_path):
    run = tmp_path / "run"
    argv = cli(run, "--set", "rl.value_pretrain_steps=0", "--set", "train.save_interval=0")
    proc = subprocess.Popen(argv, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while 1 not in ppo_records(run):
        assert proc.poll() is None, "the run ended before Ctrl-C"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:]
    assert "stopped by Ctrl-C in ppo" in out
    stopped_at = max(ppo_records(run))
    assert stopped_at < STEPS
    # no interval checkpoints: the one to resume from was written at the stop
    done = subprocess.run(argv + ["--resume"], env=environment(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r["step"] for r in records if r["phase"] == "ppo" and "ppo/rollout/reward_mean" in r]
    assert steps == list(range(1, STEPS + 1))  # resumed after the last step done: none repeated or lost
    evals = [r["step"] for r in records if "ppo/eval/greedy_acc" in r]
    assert evals == [0, STEPS]  # held-out evaluation before PPO and at the end, not repeated by the resume
