"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr``."""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """lr * (step+1)/warmup during warmup; then min_lr + (lr-min_lr) * (1+cos(pi*t))/2,
    t = (step - warmup) / (total - warmup) in [0, 1]."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
