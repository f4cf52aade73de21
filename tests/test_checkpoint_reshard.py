"""Checkpoints move between layouts: saved under (tp=2, pp=2), loaded under (tp=1, pp=1), (ep=2, dp=2)
and (pp=2, virtual_pp=2, etp=2).

The run under (tp=2, pp=2) trains two steps, saves, and trains a third. A load under
another layout must hold the same weights (bitwise: they are copies), give the same
logits, and its third step must equal the uninterrupted one within fp32 rounding, which
only holds if the ZeRO-1 master weights and Adam moments came back too.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.checkpoint import CheckpointError, flat_range_boxes
from megatron_seed.train.trainer import Trainer, lm_batch
from tests.parallel_harness import equivalence_config, full_parameters, rel_err

GLOBAL_BATCH, SEQ = 4, 16


def _config(layout: dict, save_dir: str):
    cfg = equivalence_config(layout)
    cfg.train.steps, cfg.train.save_dir = 3, save_dir
    return cfg


def _batches() -> list:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(3)]


def _local(tokens: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    rows = GLOBAL_BATCH // ps.dp_size
    return tokens[ps.dp_rank * rows:(ps.dp_rank + 1) * rows]


def _probe_logits(trainer: Trainer) -> np.ndarray:
    """Logits of a fixed input on a one-stage layout (every rank runs the forward: ep all-to-alls)."""
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(3))
    model = trainer.chunks[0]
    model.eval()
    with torch.no_grad():
        return model(ids).numpy()


def _save_run(rank: int, world: int, root: str) -> dict:
    ps = ParallelState.build(_config(dict(tp=2, pp=2), root).parallel, world, rank)
    trainer = Trainer(_config(dict(tp=2, pp=2), root), ps)
    batches = _batches()
    for tokens in batches[:2]:
        trainer.train_step(lm_batch(_local(tokens, ps)))
    trainer.save({"sampler": {"position": 5, "rng": [3, [1, 2], None]}, "weights": torch.arange(3.0)})
    at_save = full_parameters(trainer)
    trainer.train_step(lm_batch(_local(batches[2], ps)))
    return {"at_save": at_save, "after": full_parameters(trainer)}


def _resume(layout: dict, ps: ParallelState, root: str) -> dict:
    trainer = Trainer(_config(layout, root), ps)
    extra = trainer.load(root)
    loaded = full_parameters(trainer)
    logits = _probe_logits(trainer) if ps.pp_size == 1 else None
    trainer.train_step(lm_batch(_local(_batches()[2], ps)))
    return {"loaded": loaded, "logits": logits, "after": full_parameters(trainer), "extra": extra, "step": trainer.step}


def _resume_worker(rank: int, world: int, layout: dict, root: str) -> dict:
    return _resume(layout, ParallelState.build(_config(layout, root).parallel, world, rank), root)


def _merge(parts: list) -> dict:
    return {name: value for part in parts for name, value in part.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple:
    root = str(tmp_path_factory.mktemp("reshard"))
    results = run_distributed(_save_run, 4, root)
    return root, _merge([r["at_save"] for r in results]), _merge([r["after"] for r in results])


def _check(out: dict, at_save: dict, after: dict) -> None:
    assert out["step"] == 3
    for name, value in out["loaded"].items():
        np.testing.assert_array_equal(value, at_save[name], err_msg=name)
    for name, value in out["after"].items():
        assert rel_err(value, after[name]) <= 1e-5, f"{name}: the step after loading differs from the uninterrupted run"
    assert out["extra"]["sampler"] == {"position": 5, "rng": [3, [1, 2], None]}
    torch.testing.assert_close(out["extra"]["weights"], torch.arange(3.0), rtol=0, atol=0)


@pytest.mark.timeout(450)
def test_tp2_pp2_checkpoint_loads_under_other_layouts(saved) -> None:
    root, at_save, after = saved
    one = _resume({}, ParallelState.single(), root)
    assert set(one["loaded"]) == set(at_save)
    _check(one, at_save, after)
    expert = run_distributed(_resume_worker, 2, dict(ep=2, dp=2), root)
    assert _merge([r["loaded"] for r in expert]).keys() == at_save.keys()
    for out in expert:
        _check(out, at_save, after)
        assert rel_err(out["logits"], one["logits"]) <= 1e-5, "ep=2 logits differ from one process"
    interleaved = run_distributed(_resume_worker, 4, dict(pp=2, virtual_pp=2, pp_schedule="interleaved", tp=2, etp=2), root)
    assert _merge([r["loaded"] for r in interleaved]).keys() == at_save.keys()
    for out in interleaved:
        _check(out, at_save, after)


def test_optimizer_state_is_what_makes_the_next_step_match(saved) -> None:
    """The test above can fail: a load of weights only (fresh Adam moments) misses the uninterrupted step."""
    root, _, after = saved
    trainer = Trainer(_config({}, root), ParallelState.single())
    trainer.load(root)
    for b in trainer.optimizer.buckets:
        b.exp_avg.zero_()
        b.exp_avg_sq.zero_()
    trainer.train_step(lm_batch(_batches()[2]))
    errors = [rel_err(v, after[k]) for k, v in full_parameters(trainer).items()]
    assert max(errors) > 1e-3


def test_other_model_shape_and_damaged_files_fail_naming_them(saved, tmp_path) -> None:
    root, _, _ = saved
    wider = _config({}, root)
    wider.model = dataclasses.replace(wider.model, hidden_size=48)
    with pytest.raises(CheckpointError, match=r"model/.*has shape .* in the checkpoint but .* in this model"):
        Trainer(wider, ParallelState.single()).load(root)
    fewer_experts = _config({}, root)
    fewer_experts.model = dataclasses.replace(fewer_experts.model, moe=dataclasses.replace(fewer_experts.model.moe, num_experts=2, top_k=1))
    with pytest.raises(CheckpointError, match=r"router.weight has shape \(4, 32\) in the checkpoint but \(2, 32\)"):
        Trainer(fewer_experts, ParallelState.single()).load(root)

    import shutil

    latest = open(os.path.join(root, "latest")).read()
    for damage, expected in (("truncate", r"rank_00001_000.safetensors: \d+ bytes but the manifest records"),
                             ("remove", r"rank_00002_000.safetensors: missing"),
                             ("manifest", r"chunks of model/norm.weight cover")):
        copy = tmp_path / damage
        shutil.copytree(root, copy)
        ckpt_dir = copy / latest
        if damage == "truncate":
            with open(ckpt_dir / "rank_00001_000.safetensors", "r+b") as f:
                f.truncate(64)
        elif damage == "remove":
            os.remove(ckpt_dir / "rank_00002_000.safetensors")
        else:
            manifest = json.loads((ckpt_dir / "manifest.json").read_text())
            manifest["tensors"]["model/norm.weight"]["chunks"][0][2] = [1]
            (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))
        before = {p: os.path.getsize(os.path.join(ckpt_dir, p)) for p in os.listdir(ckpt_dir)}
        with pytest.raises(CheckpointError, match=expected):
            Trainer(_config({}, str(copy)), ParallelState.single()).load(str(copy))
        assert {p: os.path.getsize(os.path.join(ckpt_dir, p)) for p in os.listdir(ckpt_dir)} == before  # nothing overwritten


@pytest.mark.parametrize("shape,start,end", [((4, 3, 5), 0, 60), ((4, 3, 5), 7, 52), ((4, 3, 5), 16, 19), ((6,), 2, 5), ((2, 2), 3, 3)])
def test_flat_range_boxes_tile_the_range_in_order(shape, start, end) -> None:
    full = torch.arange(int(np.prod(shape))).view(shape)
    boxes = flat_range_boxes(shape, start, end)
    pieces = [full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1) for offsets, sizes, _ in boxes]
    got = torch.cat(pieces) if pieces else torch.empty(0, dtype=full.dtype)
    torch.testing.assert_close(got, full.reshape(-1)[start:end], rtol=0, atol=0)
    for (offsets, sizes, flat_start), piece in zip(boxes, pieces):
        assert piece[0].item() == flat_start  # each box is contiguous from flat_start
    assert len(boxes) <= 2 * len(shape) - 1
