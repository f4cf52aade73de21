"""``megatron-seed convert``: one process converts a checkpoint saved under any layout, streaming.

A checkpoint written by 4 ranks (tp=2, pp=2 or ep=2, tp=2, etp=2) converts, in one process and
into several bounded files, to the same Hugging Face tensors as the one-process model; the
README's ``convert to-hf --load runs/demo`` works through the CLI on the demo's output, and
``from-hf`` brings the weights back bitwise. Damaged inputs fail naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from megatron_seed.cli import main
from megatron_seed.commands.convert import to_hf
from megatron_seed.config import ConfigError, MoEConfig, ParallelConfig, config_from_dict
from megatron_seed.convert.hf import load_hf_checkpoint, save_hf_checkpoint
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train import checkpoint
from megatron_seed.train.checkpoint import CheckpointError
from megatron_seed.train.trainer import Trainer
from tests.model_utils import tiny_config, tiny_model

transformers = pytest.importorskip("transformers")
SEED = 5
MODEL = tiny_model(num_layers=4, moe=MoEConfig(num_experts=4, top_k=2, ffn_size=16, num_shared_experts=1, shared_ffn_size=16,
                                              score_function="sigmoid"))


def _save_sharded(rank: int, world: int, layout: dict, root: str) -> None:
    cfg = tiny_config(MODEL, seed=SEED, save_dir=os.path.join(root, "ckpt"))
    cfg.parallel = dataclasses.replace(ParallelConfig(), **layout)
    Trainer(cfg, ParallelState.build(cfg.parallel, world, rank)).save()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", [dict(tp=2, pp=2), dict(ep=2, tp=2, etp=2, sequence_parallel=True)], ids=["tp2-pp2", "ep2-tp2-etp2"])
def test_sharded_checkpoint_converts_in_one_process_to_the_one_process_weights(tmp_path, layout: dict) -> None:
    run_distributed(_save_sharded, 4, layout, str(tmp_path))
    assert to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), max_bytes=40_000) == 0
    assert len([p for p in os.listdir(tmp_path / "hf") if p.endswith(".safetensors")]) > 1  # bounded files
    one = GPTModel(MODEL, ParallelState.single())
    one.init_weights(SEED)  # layout-independent initialisation: the same weights as the sharded run
    save_hf_checkpoint(one.state_dict(), MODEL, str(tmp_path / "reference"))
    _, got = load_hf_checkpoint(str(tmp_path / "hf"))
    _, expected = load_hf_checkpoint(str(tmp_path / "reference"))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.timeout(240)
def test_readme_convert_command_works_on_the_demo_output(tmp_path, monkeypatch, capsys) -> None:
    """The README's commands through the CLI's entry point, in this process (each would start a fresh interpreter)."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "2"]) == 0
    assert main(["convert", "to-hf", "--load", "runs/demo", "--out", "hf_model"]) == 0
    assert "Glm4MoeForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_model"), dtype=torch.float32).eval()
    ckpt = checkpoint.open_checkpoint(str(tmp_path / "runs" / "demo"))
    m = config_from_dict(ckpt.meta["config"]).model
    ours = GPTModel(m, ParallelState.single())
    checkpoint.load_model_weights([ours], ParallelState.single(), str(tmp_path / "runs" / "demo"))
    ids = torch.randint(0, m.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4

    assert main(["convert", "from-hf", "--hf", "hf_model", "--out", "runs/imported"]) == 0
    imported = checkpoint.open_checkpoint(str(tmp_path / "runs" / "imported"))
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(imported.read_full(f"model/{name}"), tensor, rtol=0, atol=0, msg=name)

    capsys.readouterr()
    assert main(["convert", "to-hf", "--load", "runs/demo", "--out", "hf_model"]) != 0
    assert "not empty; nothing was written" in capsys.readouterr().err


def test_damaged_checkpoint_fails_naming_the_file(tmp_path) -> None:
    trainer = Trainer(tiny_config(MODEL, save_dir=str(tmp_path / "ckpt")), ParallelState.single())
    path = trainer.save()
    with open(os.path.join(path, "manifest.json")) as f:
        files = json.load(f)["files"]
    victim = os.path.join(path, sorted(files)[0])
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 8)
    with pytest.raises(CheckpointError, match=f"{sorted(files)[0]}: .* bytes but the manifest records"):
        to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), max_bytes=2**30)
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ConfigError, match="HF config: model_type='llama'"):
        os.makedirs(tmp_path / "llama")
        with open(tmp_path / "llama" / "config.json", "w") as f:
            json.dump({"model_type": "llama"}, f)
        load_hf_checkpoint(str(tmp_path / "llama"))
