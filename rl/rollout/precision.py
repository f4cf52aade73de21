"""The weights a rollout samples with, at ``rollout.dtype`` (auto | fp32 | bf16; auto = the trained parameters' dtype).

When the trained model's parameters already have that dtype the rollout samples with them
directly (colocated, nothing copied), and its behaviour log-probs are exactly the training
forward's. Otherwise the engine samples with a copy of this rank's model chunk in ``rollout.dtype``:
built once per trained chunk and dtype in the process (the same stage, layers and sharding as the
trained chunk, so it runs under every layout the chunk does) and shared by every engine on that
chunk (an RL run's rollout, its held-out evaluation and its SFT validation hold one copy, not
three), and refreshed in place from the trained weights, a cast-copy of this
rank's parameters and buffers, at the start of every ``generate`` call (the trained weights
change between calls: once per PPO step in an RL run), never per decode step. Its KV cache
takes its dtype too (bf16: half the bytes per cached token). Sampling still runs in fp32 on
the bf16 logits (:func:`rl.rollout.sampling.sample`), and the model's own fp32 islands (router,
norms, softmax) stay fp32. The behaviour log-probs of such a rollout come from another
precision, so the PPO trainer recomputes them with the training forward and keeps the
rollout's for truncated importance sampling (``rl.tis_cap``) and the mismatch metrics.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from megatron_seed.model.build import materialise
from megatron_seed.model.gpt import GPTModel

ROLLOUT_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}  # None: the trained parameters' dtype


def model_dtype(model: GPTModel) -> torch.dtype:
    """The dtype of ``model``'s parameters (all floating-point parameters share it)."""
    return next(model.parameters()).dtype


class SamplingWeights:
    """``model``: what the rollout runs for the trained chunk ``trained`` at ``dtype`` (None: ``trained``'s own; see the
    module docstring)."""

    def __init__(self, trained: GPTModel, dtype: Optional[torch.dtype]):
        self.trained = trained
        self.is_copy = dtype is not None and model_dtype(trained) != dtype
        self.model = _shared_copy(trained, dtype) if self.is_copy else trained

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast-copy the trained weights into the copy (nothing to do when the rollout samples with them)."""
        if self.is_copy:
            self.model.load_state_dict(self.trained.state_dict())


_COPIES: "weakref.WeakKeyDictionary[GPTModel, dict]" = weakref.WeakKeyDictionary()  # trained chunk -> {dtype: copy}


def _shared_copy(trained: GPTModel, dtype: torch.dtype) -> GPTModel:
    """The process's one copy of ``trained`` at ``dtype`` (it lives as long as ``trained`` does)."""
    copies = _COPIES.setdefault(trained, {})
    if dtype not in copies:
        copies[dtype] = _copy_of(trained, dtype)
    return copies[dtype]


def _copy_of(trained: GPTModel, dtype: torch.dtype) -> GPTModel:
    """A chunk built like ``trained`` (on its groups, stage and device) with floating-point parameters in ``dtype``
    (buffers keep theirs) and no gradients, holding ``trained``'s weights."""
    device = next(trained.parameters()).device
    with torch.device("meta"):
        model = GPTModel(trained.cfg, trained.ps, trained.layer_ids, pre_process=trained.pre_process, post_process=trained.post_process)
    materialise(model, device, dtype)
    model.requires_grad_(False)
    with torch.no_grad():
        model.load_state_dict(trained.state_dict())
    return model.train(trained.training)
