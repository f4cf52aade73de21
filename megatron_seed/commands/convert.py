"""``megatron-seed convert``: our checkpoints <-> Hugging Face Qwen3-MoE directories.

    megatron-seed convert to-hf   --load runs/demo --out hf_model/
    megatron-seed convert from-hf --hf hf_model/   --out runs/imported

Checkpoints of one process (world size 1) are converted directly; a sharded
checkpoint names the layout it was saved with.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("direction", choices=["to-hf", "from-hf"])
    parser.add_argument("--load", help="our checkpoint directory (to-hf)")
    parser.add_argument("--hf", help="Hugging Face model directory (from-hf)")
    parser.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from megatron_seed.config import Config, ModelConfig, MoEConfig, save_config
    from megatron_seed.convert.hf import load_hf_checkpoint, save_hf_checkpoint
    from megatron_seed.train import checkpoint

    if args.direction == "to-hf":
        if not args.load:
            raise SystemExit("convert to-hf needs --load <checkpoint dir>")
        meta, state = checkpoint.load_checkpoint(args.load, rank=0)
        if meta["layout"]["world"] != 1:
            raise SystemExit(f"{args.load} holds a checkpoint of {meta['layout']['world']} ranks ({meta['layout']}); convert supports world size 1")
        model_dict = dict(meta["config"]["model"])
        model_cfg = ModelConfig(**{**model_dict, "moe": MoEConfig(**model_dict["moe"])})
        save_hf_checkpoint(state["model"][0], model_cfg, args.out)
        print(f"wrote {args.out} (Qwen3MoeForCausalLM)")
        return 0
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
