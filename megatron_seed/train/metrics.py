"""Throughput, model FLOPs utilisation, and a JSONL + TensorBoard + console metrics logger."""
from __future__ import annotations

import json
import math
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


def _plain(v):
    """A JSON value: numbers as floats, NaN / Inf as None (JSON has no NaN), other values as they are."""
    if isinstance(v, (bool, int, float, torch.Tensor)):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


def _drop_torn_line(path: str) -> None:
    """Cut a last line without its newline (a process killed while writing it) so appends start on a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class MetricsLogger:
    """Writes one JSON object per logged step to ``path``, the numbers to TensorBoard under
    ``tensorboard_dir`` (when given) and a line to stdout; only where ``enabled`` (one rank)."""

    def __init__(self, path: Optional[str], enabled: bool = True, tensorboard_dir: Optional[str] = None):
        self.enabled = enabled
        self.file = None
        self.tensorboard = None
        if enabled and path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            _drop_torn_line(path)
            self.file = open(path, "a")
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported here: needs the tensorboard package

            self.tensorboard = SummaryWriter(tensorboard_dir)

    def log(self, step: int, metrics: dict, echo: bool = True, write=None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.file:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float):
                    self.tensorboard.add_scalar(k, v, step)
        if echo:
            text = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items())
            (write or (lambda s: print(s, file=sys.stdout, flush=True)))(text)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
