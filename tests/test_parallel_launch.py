"""``launch/torchrun.sh``: `megatron-seed train` really runs as 2 torchrun processes on CPU (gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_seed.parallel.spawn import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.pp=2", "train.micro_batch_size=2"]])
def test_torchrun_trains_two_processes(tmp_path, layout):
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    sets = ["model.num_layers=2", "model.hidden_size=32", "model.head_dim=8", "model.moe.ffn_size=16",
            "model.moe.shared_ffn_size=16", "train.seq_len=32", "train.steps=2", "train.log_interval=1",
            f"train.save_dir={tmp_path}", *layout]
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "train", "--preset", "tiny", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2 | loss" in proc.stdout
    assert (tmp_path / "iter_0000002" / "manifest.json").exists()
    assert (tmp_path / "iter_0000002" / "rank_00000_000.safetensors").exists()
    assert (tmp_path / "iter_0000002" / "rank_00001_000.safetensors").exists()
