"""``convert to-hf`` of a sharded checkpoint: N ranks gather it, and the files equal the one-process export."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron_seed.commands.convert import to_hf
from megatron_seed.config import ConfigError, MoEConfig, ParallelConfig
from megatron_seed.convert.hf import load_hf_checkpoint, save_hf_checkpoint
from megatron_seed.model.build import build_model_chunks
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train import checkpoint
from tests.model_utils import tiny_config, tiny_model

pytest.importorskip("safetensors")
SEED = 5


def _config(layout: dict):
    cfg = tiny_config(tiny_model(num_layers=4, moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16)), seed=SEED)
    cfg.parallel = dataclasses.replace(ParallelConfig(), **layout)
    return cfg


def _save_sharded(rank: int, world: int, layout: dict, root: str) -> None:
    """Save a checkpoint of ``world`` ranks the way the trainer lays it out, then convert it with the same ranks."""
    cfg = _config(layout)
    ps = ParallelState.build(cfg.parallel, world, rank)
    chunks = build_model_chunks(cfg.model, cfg.parallel, ps, SEED)
    l = ps.layout
    meta = {"layout": {"world": l.world, "tp": l.tp, "pp": l.pp, "dp": l.dp, "ep": l.ep, "etp": l.etp, "cp": l.cp,
                       "virtual_pp": cfg.parallel.virtual_pp}, "config": cfg.to_dict()}
    checkpoint.save_checkpoint(os.path.join(root, "ckpt"), 7, {"model": [c.state_dict() for c in chunks]}, rank, meta)
    to_hf(os.path.join(root, "ckpt"), os.path.join(root, "hf"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,layout", [(4, dict(tp=2, pp=2)), (4, dict(ep=2, tp=2, etp=2, sequence_parallel=True))],
                         ids=["tp2-pp2", "ep2-tp2-etp2"])
def test_sharded_checkpoint_converts_to_the_one_process_weights(tmp_path, world: int, layout: dict) -> None:
    run_distributed(_save_sharded, world, layout, str(tmp_path))
    one = GPTModel(_config({}).model, ParallelState.single())
    one.init_weights(SEED)  # layout-independent initialisation: the same weights as the sharded run
    save_hf_checkpoint(one.state_dict(), one.cfg, str(tmp_path / "reference"))
    _, got = load_hf_checkpoint(str(tmp_path / "hf"))
    _, expected = load_hf_checkpoint(str(tmp_path / "reference"))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_world_size_mismatch_names_the_torchrun_command(tmp_path) -> None:
    run_distributed(_save_sharded, 2, dict(tp=2), str(tmp_path))
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        to_hf(str(tmp_path / "ckpt"), str(tmp_path / "again"))
