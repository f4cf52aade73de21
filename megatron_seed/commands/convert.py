"""``megatron-seed convert``: our checkpoints <-> Hugging Face (Qwen3-MoE / GLM-4.5-MoE) and megatron-core.

    megatron-seed convert to-hf     --load runs/demo   --out hf_model/
    megatron-seed convert from-hf   --hf hf_model/     --out runs/imported
    megatron-seed convert to-mcore  --load runs/demo   --out mcore/
    megatron-seed convert from-mcore --mcore mcore/    --out runs/from_mcore

One process converts a checkpoint saved under any layout: the manifest gives every
tensor's global shape and chunks, and tensors are read, converted and written one at a
time (files of at most ``--max-shard-gb``), so a conversion holds about one output file.
Nothing is written into an existing non-empty ``--out``.
"""
from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("direction", choices=["to-hf", "from-hf", "to-mcore", "from-mcore"])
    parser.add_argument("--load", help="our checkpoint directory (to-hf, to-mcore)")
    parser.add_argument("--hf", help="Hugging Face model directory (from-hf)")
    parser.add_argument("--mcore", help="directory written by to-mcore (from-mcore)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest output file, GiB")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import ConfigError

    needed = {"to-hf": "load", "to-mcore": "load", "from-hf": "hf", "from-mcore": "mcore"}[args.direction]
    if not getattr(args, needed):
        raise SystemExit(f"convert {args.direction} needs --{needed} <dir>")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ConfigError(f"--out {args.out}: exists and is not empty; nothing was written; fix: choose a new directory or empty it")
    max_bytes = int(args.max_shard_gb * 2**30)
    if args.direction == "to-hf":
        return to_hf(args.load, args.out, max_bytes)
    if args.direction == "from-hf":
        return from_hf(args.hf, args.out, max_bytes)
    if args.direction == "to-mcore":
        return to_mcore(args.load, args.out, max_bytes)
    return from_mcore(args.mcore, args.out, max_bytes)


def _open(load_dir: str) -> tuple:
    from megatron_seed.config import config_from_dict
    from megatron_seed.convert.hf import TensorSource
    from megatron_seed.train import checkpoint

    ckpt = checkpoint.open_checkpoint(load_dir)
    return ckpt, config_from_dict(ckpt.meta["config"]), TensorSource.from_checkpoint(ckpt)


def _save_ours(items, model_cfg, out: str, max_bytes: int) -> str:
    from megatron_seed.config import Config
    from megatron_seed.train import checkpoint

    cfg = Config(model=model_cfg)
    cfg.train.save_dir = out
    layout = {"world": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1, "etp": 1, "cp": 1, "virtual_pp": 1}
    state = {"trainer": {"step": 0, "consumed_samples": 0}, "meta": {"layout": layout, "config": cfg.to_dict()}}
    return checkpoint.save_stream(out, 0, ((f"model/{k}", v) for k, v in items), state, max_bytes)


def to_hf(load_dir: str, out: str, max_bytes: int) -> int:
    """Write the latest checkpoint in ``load_dir`` as a Hugging Face directory ``out``."""
    from megatron_seed.convert.hf import FAMILIES, export, family

    ckpt, cfg, source = _open(load_dir)
    files = export(source, cfg.model, out, max_bytes)
    causal, base = FAMILIES[family(cfg.model)]
    print(f"wrote {out} ({base + ' + value head' if cfg.model.value_head else causal}, {len(files)} file(s)) from {ckpt.path}")
    return 0


def from_hf(hf_dir: str, out: str, max_bytes: int) -> int:
    from megatron_seed.convert.hf import from_hf_tensors, hf_file_tensors, read_hf_config

    m = read_hf_config(hf_dir)
    path = _save_ours(from_hf_tensors(hf_file_tensors(hf_dir), m), m, out, max_bytes)
    print(f"wrote {path}; train from it with --set train.load_dir={out} (model weights only: a fresh optimizer)")
    return 0


def to_mcore(load_dir: str, out: str, max_bytes: int) -> int:
    from megatron_seed.convert.mcore import export_mcore

    ckpt, cfg, source = _open(load_dir)
    files = export_mcore(source, cfg.model, out, max_bytes)
    print(f"wrote {out} (megatron-core GPTModel state dict, {len(files)} file(s)) from {ckpt.path}")
    return 0


def from_mcore(mcore_dir: str, out: str, max_bytes: int) -> int:
    from megatron_seed.convert.mcore import import_mcore

    m, items = import_mcore(mcore_dir)
    path = _save_ours(items, m, out, max_bytes)
    print(f"wrote {path}; train from it with --set train.load_dir={out} (model weights only: a fresh optimizer)")
    return 0
