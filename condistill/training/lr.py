"""The optimizer of the adapter and its learning-rate schedule.

:func:`build_optimizer` makes the ``--optimizer`` of a run: ``adamw`` (``torch.optim.AdamW``) or
``adamw8bit`` (bitsandbytes' 8-bit AdamW, CUDA only: its two moment buffers take a quarter of the
memory). The schedule is a linear warm-up, then constant or cosine decay to a floor; one
function serves the distillation loop (warm-up then constant, diffusers' ``constant_with_warmup``
exactly) and the tools that build the embedded world (warm-up then cosine decay).
"""
from __future__ import annotations

import importlib
import math
from typing import Iterable

import torch

__all__ = ["OPTIMIZERS", "build_optimizer", "lr_factor", "warmup_schedule"]

#: ``--optimizer`` choices
OPTIMIZERS = ("adamw", "adamw8bit")


def build_optimizer(name: str, params: Iterable[torch.Tensor], learning_rate: float, weight_decay: float,
                    device: torch.device | str) -> torch.optim.Optimizer:
    """The optimizer ``name`` (:data:`OPTIMIZERS`) over ``params``, which live on ``device``.

    Raises:
        ValueError: an unknown name, or ``adamw8bit`` where it cannot run (no CUDA device, or
            bitsandbytes missing); the message says what is needed.
    """
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name != "adamw8bit":
        raise ValueError(f"optimizer={name!r}: choose one of {list(OPTIMIZERS)}")
    if torch.device(device).type != "cuda":
        raise ValueError(f"optimizer='adamw8bit' runs on CUDA GPUs only (bitsandbytes' 8-bit AdamW) and this run's "
                         f"device is {torch.device(device).type}; train on a CUDA GPU or pass --optimizer adamw")
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise ValueError("optimizer='adamw8bit' needs the bitsandbytes package: `pip install bitsandbytes` "
                         f"(or pass --optimizer adamw); importing it failed: {error}") from error
    return bnb.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)


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
