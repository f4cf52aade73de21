"""``megatron-seed convert``: our checkpoints <-> Hugging Face Qwen3-MoE directories.

    megatron-seed convert to-hf   --load runs/demo --out hf_model/
    megatron-seed convert from-hf --hf hf_model/   --out runs/imported

A sharded checkpoint (saved by N ranks) is converted by N ranks with the same layout,
which gather every parameter to full shape and let rank 0 write the Hugging Face files:

    torchrun --nproc-per-node N -m megatron_seed.cli convert to-hf --load runs/big --out hf_model/
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("direction", choices=["to-hf", "from-hf"])
    parser.add_argument("--load", help="our checkpoint directory (to-hf)")
    parser.add_argument("--hf", help="Hugging Face model directory (from-hf)")
    parser.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import Config, save_config
    from megatron_seed.convert.hf import load_hf_checkpoint
    from megatron_seed.train import checkpoint

    if args.direction == "to-hf":
        if not args.load:
            raise SystemExit("convert to-hf needs --load <checkpoint dir>")
        return to_hf(args.load, args.out)
    if not args.hf:
        raise SystemExit("convert from-hf needs --hf <model dir>")
    model_cfg, sd = load_hf_checkpoint(args.hf)
    cfg = Config(model=model_cfg)
    cfg.train.save_dir = args.out
    meta = {"layout": {"world": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1, "etp": 1, "cp": 1, "virtual_pp": 1}, "config": cfg.to_dict()}
    path = checkpoint.save_checkpoint(args.out, 0, {"model": [sd], "step": 0, "consumed_samples": 0}, 0, meta)
    save_config(cfg, f"{path}/config.yaml")
    print(f"wrote {path}; train from it with --set train.load_dir={args.out} (model weights only: a fresh optimizer)")
    return 0


def to_hf(load_dir: str, out: str) -> int:
    """Write the latest checkpoint in ``load_dir`` as a Hugging Face Qwen3-MoE directory ``out``.

    Run by as many ranks as saved the checkpoint: each loads its shard into the model
    of its layout, :func:`~megatron_seed.parallel.sharding.full_state_dict` gathers the
    full weights to rank 0, and rank 0 writes them.
    """
    from megatron_seed.config import ConfigError, config_from_dict
    from megatron_seed.convert.hf import save_hf_checkpoint
    from megatron_seed.model.build import build_model_chunks
    from megatron_seed.parallel.sharding import full_state_dict
    from megatron_seed.parallel.state import ParallelState, init_distributed
    from megatron_seed.train import checkpoint

    rank, world = init_distributed()
    meta, state = checkpoint.load_checkpoint(load_dir, rank)
    saved = meta["layout"]["world"]
    if saved != world:
        raise ConfigError(
            f"{load_dir} holds a checkpoint of {saved} ranks (layout {meta['layout']}) but convert runs on {world}; "
            f"fix: torchrun --nproc-per-node {saved} -m megatron_seed.cli convert to-hf --load {load_dir} --out {out}"
        )
    cfg = config_from_dict(meta["config"])
    ps = ParallelState.build(cfg.parallel, world, rank)
    chunks = build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed)
    for model, weights in zip(chunks, state["model"]):
        model.load_state_dict(weights)
    full = full_state_dict(chunks, ps)
    if full is not None:
        save_hf_checkpoint(full, cfg.model, out)
        print(f"wrote {out} (Qwen3MoeForCausalLM) from {saved} rank(s)")
    return 0
