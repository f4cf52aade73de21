"""Build the model chunks this rank holds, initialised as the one-process model."""
from __future__ import annotations

from megatron_seed.config import ModelConfig, ParallelConfig
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.stages import stage_chunks
from megatron_seed.parallel.state import ParallelState


def build_model_chunks(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, ps: ParallelState, seed: int) -> list:
    """One GPTModel per virtual stage of this pipeline rank (a single one without pp)."""
    chunks = stage_chunks(model_cfg.num_layers, ps.pp_size, parallel_cfg.virtual_pp, ps.pp_rank, parallel_cfg.pp_layers)
    models = []
    for v, layer_ids in enumerate(chunks):
        first = ps.is_first_stage and v == 0
        last = ps.is_last_stage and v == len(chunks) - 1
        model = GPTModel(model_cfg, ps, layer_ids, pre_process=first, post_process=last)
        model.init_weights(seed)
        models.append(model)
    return models
