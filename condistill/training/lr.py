"""The learning-rate schedule: linear warm-up, then constant or cosine decay to a floor.

One function serves the distillation loop (warm-up then constant, diffusers'
``constant_with_warmup`` exactly) and the tools that build the embedded world (warm-up then
cosine decay).
"""
from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "warmup_schedule"]


def lr_factor(step: int, warmup: int, total: int | None = None, floor: float = 1.0) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    ``step / warmup`` during the first ``warmup`` steps; afterwards 1 when ``total`` is None (or
    ``floor`` is 1), else a cosine from 1 at ``warmup`` down to ``floor`` at ``total``.
    """
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if total is None or floor == 1.0:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int | None = None,
                    floor: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor` (its state dict resumes like any torch scheduler)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, floor))
