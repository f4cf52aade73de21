"""Exact resume through the product: a 2-process ``megatron-seed train`` killed with SIGKILL and
restarted with ``--resume`` gives the uninterrupted run's loss curve bit for bit; a crash inside
a save leaves ``latest`` at the previous checkpoint, which loads; an asynchronous save resumes
like a blocking one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_seed.parallel.spawn import free_port
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train import checkpoint
from megatron_seed.train.checkpoint import CheckpointError
from megatron_seed.train.trainer import Trainer
from tests.model_utils import tiny_config

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 30, 3


def _launch(save_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    sets = ["model.num_layers=2", "model.hidden_size=32", "model.head_dim=8", "model.moe.ffn_size=16", "model.moe.shared_ffn_size=16",
            "train.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=4", f"train.steps={STEPS}", "train.log_interval=1",
            f"train.save_interval={SAVE_EVERY}", f"train.save_dir={save_dir}", "parallel.tp=2"]
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "train", "--preset", "tiny", "--no-progress", *extra]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _losses(save_dir: Path) -> dict:
    """Loss per step from metrics.jsonl (a resumed run appends: the last line of a step wins)."""
    out = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def _latest_step(save_dir: Path) -> int:
    pointer = save_dir / "latest"
    return int(pointer.read_text().split("_")[1]) if pointer.exists() else 0


@pytest.mark.timeout(600)
def test_sigkilled_multiprocess_run_resumes_with_the_same_loss_curve(tmp_path) -> None:
    straight = _launch(tmp_path / "straight")
    output = straight.communicate(timeout=280)[0]
    assert straight.returncode == 0, output[-3000:]

    killed = _launch(tmp_path / "killed")
    while _latest_step(tmp_path / "killed") < 2 * SAVE_EVERY and killed.poll() is None:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # every process of the run, mid-training
    killed.wait()
    stopped_at = _latest_step(tmp_path / "killed")
    assert SAVE_EVERY <= stopped_at < STEPS, f"the run was not stopped mid-training (latest = step {stopped_at})"

    resumed = _launch(tmp_path / "killed", "--resume")
    output = resumed.communicate(timeout=280)[0]
    assert resumed.returncode == 0, output[-3000:]
    expected, got = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bitwise: same layout on CPU


def _trainer(save_dir: Path, steps: int, **train) -> Trainer:
    return Trainer(tiny_config(steps=steps, save_dir=str(save_dir), save_interval=2, **train), ParallelState.single())


def _batches():
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, 64, (4, 17), generator=gen)


def test_crash_during_save_leaves_latest_at_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(_batches())
    good = {k: v.clone() for k, v in trainer.chunks[0].state_dict().items()}
    real_save = safetensors.torch.save_file

    def crash_midway(tensors: dict, filename: str, metadata=None) -> None:
        real_save(dict(list(tensors.items())[: len(tensors) // 2]), filename, metadata)  # half a file, then the crash
        raise OSError("disk full (injected)")

    trainer.cfg.train.steps = 4
    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(CheckpointError, match="iter_0000004 failed.*latest still names the previous checkpoint"):
        trainer.fit(_batches())
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "iter_0000002"
    assert not (tmp_path / "iter_0000004").exists()
    fresh = _trainer(tmp_path, steps=4)
    assert fresh.load(str(tmp_path))["step"] == 2
    for name, tensor in fresh.chunks[0].state_dict().items():
        torch.testing.assert_close(tensor, good[name], rtol=0, atol=0, msg=name)


def test_async_save_resumes_like_a_blocking_one(tmp_path) -> None:
    blocking, background = _trainer(tmp_path / "sync", steps=4), _trainer(tmp_path / "async", steps=4, async_save=True)
    blocking.fit(_batches())
    background.fit(_batches())
    assert (tmp_path / "async" / "latest").read_text() == "iter_0000004"  # fit publishes the last one before returning
    for name in ("sync", "async"):
        resumed = _trainer(tmp_path / "again", steps=4)
        resumed.load(str(tmp_path / name))
        ckpt = checkpoint.open_checkpoint(str(tmp_path / name))
        assert ckpt.step == 4
        for key, tensor in resumed.chunks[0].state_dict().items():
            torch.testing.assert_close(tensor, blocking.chunks[0].state_dict()[key], rtol=0, atol=0, msg=f"{name}: {key}")
