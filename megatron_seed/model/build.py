"""Build the model chunks this rank holds, initialised as the one-process model, on the rank's device."""
from __future__ import annotations

import torch
from torch import nn

from megatron_seed.config import ModelConfig, ParallelConfig
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.stages import stage_chunks
from megatron_seed.parallel.state import ParallelState


def param_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``train.precision`` as the parameters' dtype: ``auto`` is bf16 on cuda, fp32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def build_model_chunks(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, ps: ParallelState, seed: int,
                       dtype: torch.dtype = torch.float32) -> list:
    """One GPTModel per virtual stage of this pipeline rank (a single one without pp), on ``ps.device``
    with floating-point parameters in ``dtype`` (buffers stay fp32).

    Each chunk is constructed on ``meta`` (no memory) and materialised on ``ps.device``, so a
    big model never takes a full copy in host memory; then initialised (a no-op on meta,
    which holds no values).
    """
    chunks = stage_chunks(model_cfg.num_layers, ps.pp_size, parallel_cfg.virtual_pp, ps.pp_rank, parallel_cfg.pp_layers)
    models = []
    for v, layer_ids in enumerate(chunks):
        first = ps.is_first_stage and v == 0
        last = ps.is_last_stage and v == len(chunks) - 1
        with torch.device("meta"):
            model = GPTModel(model_cfg, ps, layer_ids, pre_process=first, post_process=last)
        materialise(model, ps.device, dtype)
        model.init_weights(seed)
        models.append(model)
    return models


def materialise(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Give every parameter and buffer of a model built on ``meta`` (uninitialised) storage on ``device``,
    floating-point parameters in ``dtype``.

    Unlike ``Module.to_empty``, the parameters keep their attributes (the sharding record).
    """
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                fresh = nn.Parameter(torch.empty_like(p, device=device, dtype=dtype if p.is_floating_point() else p.dtype),
                                     requires_grad=p.requires_grad)
                fresh.__dict__.update(p.__dict__)
                module._parameters[name] = fresh
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device=device)
