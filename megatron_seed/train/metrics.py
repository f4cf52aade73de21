"""Throughput, model FLOPs utilisation, and a JSONL + console metrics logger."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch

from megatron_seed.config import ModelConfig
from megatron_seed.params import count_parameters


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward).

    Forward: 2 x (activated parameters except the input embedding, which is a lookup)
    for the matmuls, plus causal attention scores and values: 2 x 2 x (S/2) x N x D per
    layer (half the keys on average under the causal mask).
    """
    counts = count_parameters(m)
    matmul_params = counts.activated - m.vocab_size * m.hidden_size
    attention = 2 * seq_len * m.num_attention_heads * m.head_dim * m.num_layers
    return 3.0 * (2.0 * matmul_params + attention)


def peak_flops(configured_tflops: float) -> float:
    """Peak FLOP/s of one device: the configured value, else a guess (bf16 dense)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0)):
            if key in name:
                return tflops * 1e12
        return 100e12
    return 0.1e12 * max(1, torch.get_num_threads())  # a CPU core: order of 100 GFLOP/s fp32


class MetricsLogger:
    """Writes one JSON object per logged step to ``path`` and a line to stdout (rank 0)."""

    def __init__(self, path: Optional[str], enabled: bool = True):
        self.enabled = enabled
        self.file = None
        if enabled and path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.file = open(path, "a")

    def log(self, step: int, metrics: dict, echo: bool = True, write=None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()}}
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if echo:
            text = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items())
            (write or (lambda s: print(s, file=sys.stdout, flush=True)))(text)

    def close(self) -> None:
        if self.file:
            self.file.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
