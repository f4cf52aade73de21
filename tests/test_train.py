"""Single-process trainer: loss falls, NaN stops cleanly, resume is exact, bad checkpoints are named."""
import os

import pytest
import torch

from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.checkpoint import CheckpointError
from megatron_seed.train.trainer import NonFiniteLossError, Trainer, lm_batch
from tests.model_utils import tiny_config


def batches(seed: int, n_distinct: int = 2, rows: int = 4, seq: int = 16):
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, 64, (rows, seq + 1), generator=gen) for _ in range(n_distinct)]
    i = 0
    while True:
        yield data[i % n_distinct]
        i += 1


def test_loss_falls(tmp_path):
    cfg = tiny_config(steps=30, save_dir=str(tmp_path))
    trainer = Trainer(cfg, ParallelState.single())
    it = batches(0)
    first = trainer.train_step(lm_batch(next(it)))["loss"]
    last = trainer.fit(it)
    assert last["loss"] < 0.7 * first


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_config(steps=6, save_dir=str(tmp_path), save_interval=2)
    trainer = Trainer(cfg, ParallelState.single())
    good = batches(1)

    def poisoned():
        for step in range(100):
            tokens = next(good)
            if step == 3:
                with torch.no_grad():
                    next(trainer.chunks[0].parameters()).fill_(float("nan"))
            yield tokens

    with pytest.raises(NonFiniteLossError, match="step 3.*iter_0000002"):
        trainer.fit(poisoned())
    assert open(tmp_path / "latest").read() == "iter_0000002"


def test_resume_is_exact(tmp_path):
    straight = Trainer(tiny_config(steps=4, save_dir=str(tmp_path / "a")), ParallelState.single())
    straight.fit(batches(2))
    first = Trainer(tiny_config(steps=2, save_dir=str(tmp_path / "b")), ParallelState.single())
    it = batches(2)
    first.fit(it)
    first.save()
    resumed = Trainer(tiny_config(steps=4, save_dir=str(tmp_path / "b")), ParallelState.single())
    resumed.load(str(tmp_path / "b"))
    resumed.fit(it)
    for p, q in zip(straight.chunks[0].parameters(), resumed.chunks[0].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_corrupt_checkpoint_is_named(tmp_path):
    trainer = Trainer(tiny_config(steps=1, save_dir=str(tmp_path)), ParallelState.single())
    trainer.fit(batches(3))
    path = trainer.save()
    with open(os.path.join(path, "rank_00000_000.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="rank_00000_000.safetensors: .*truncated"):
        trainer.load(str(tmp_path))
