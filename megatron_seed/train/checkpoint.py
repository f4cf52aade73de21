"""Crash-safe checkpoints: one file per rank, written under a temporary name and renamed.

Layout::

    save_dir/
      latest                      text: "iter_0000100"   (replaced atomically)
      iter_0000100/
        meta.json                 step, layout, config
        rank_00000.pt ...         this rank's model shards, optimizer state, RNG, data position

A crash mid-save leaves ``iter_XXXXXXX.tmp`` behind and ``latest`` pointing at the
previous complete checkpoint. Loading checks the layout and names the bad file.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or from another layout."""


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(save_dir: str, step: int, state: dict, rank: int, meta: dict) -> str:
    """Collective: every rank writes its ``state``; rank 0 publishes the directory."""
    final = os.path.join(save_dir, _iter_name(step))
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    _barrier()
    torch.save(state, os.path.join(tmp, f"rank_{rank:05d}.pt"))
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, **meta}, f, indent=1, default=str)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = os.path.join(save_dir, "latest.tmp")
        with open(pointer, "w") as f:
            f.write(_iter_name(step))
        os.replace(pointer, os.path.join(save_dir, "latest"))
    _barrier()
    return final


def latest_checkpoint(load_dir: str) -> Optional[str]:
    pointer = os.path.join(load_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(load_dir, f.read().strip())


def load_checkpoint(load_dir: str, rank: int, layout: Optional[dict] = None) -> tuple:
    """Return ``(meta, state)`` of this rank from the latest checkpoint in ``load_dir``."""
    path = latest_checkpoint(load_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {load_dir!r} (no 'latest' file); fix: point train.load_dir at a save_dir of an earlier run")
    available = sorted(d for d in os.listdir(load_dir) if d.startswith("iter_") and not d.endswith(".tmp"))
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e}); available checkpoints: {available}; fix: write the name of an intact one into {load_dir}/latest") from e
    if layout is not None and meta.get("layout") != layout:
        raise CheckpointError(
            f"{path} was saved with layout {meta.get('layout')} but this run uses {layout}; "
            "fix: resume with the same layout"
        )
    rank_path = os.path.join(path, f"rank_{rank:05d}.pt")
    try:
        state = torch.load(rank_path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or garbled file raises many different errors
        raise CheckpointError(
            f"{rank_path}: corrupt or missing ({type(e).__name__}: {e}); available checkpoints: {available}; "
            f"fix: write the name of an intact one into {load_dir}/latest"
        ) from e
    return meta, state
