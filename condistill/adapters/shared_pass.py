"""One pass of a frozen block for several branches that feed it the same inputs.

In a ControlNet distillation step the online branch and the one-step ODE branch evaluate the
frozen UNet at the same ``(z_t, t, text)``. A ControlNet's residuals join the UNet only at the
skip connections and after the mid block, so the UNet's down blocks and mid block see exactly
the same inputs in both branches and return exactly the same outputs. Inside
:func:`shared_frozen_blocks` such a block runs once: a second call with inputs equal to an
earlier call's (same shapes, dtypes, devices and values, compared exactly) returns the earlier
output. The result is bit-identical to running the block twice; only the repeated work goes.

A block is shared only when nothing about it can differ between the calls:

* none of its parameters requires grad (a trainable block, e.g. one holding LoRA layers or
  weights an EMA swaps in and out, is refused with a ``ValueError``);
* no input of the call requires grad (its output would carry a graph; such calls always run);
* the outputs are not modified in place by their users (true of the UNet's down and mid blocks
  under a ControlNet; a T2I-Adapter adds its features inside the down blocks, in place, so it
  gets no shared blocks).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["SharedPassStats", "same_inputs", "shared_frozen_blocks"]


@dataclass
class SharedPassStats:
    """Calls of the shared blocks inside one :func:`shared_frozen_blocks` context."""

    hits: int = 0  # calls answered with an earlier call's output
    runs: int = 0  # calls that ran the block


def same_inputs(a: Any, b: Any) -> bool:
    """Whether two call arguments are interchangeable: equal structure, tensors equal exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and bool(torch.equal(a, b)))
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
                and all(same_inputs(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same_inputs(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def _requires_grad(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, Mapping):
        return any(_requires_grad(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_requires_grad(v) for v in value)
    return False


@contextlib.contextmanager
def shared_frozen_blocks(blocks: Iterable[nn.Module]) -> Iterator[SharedPassStats]:
    """Within the context, each block of ``blocks`` runs once per distinct input.

    Outputs are kept until the context exits (one training micro-step), so memory grows by the
    outputs of the shared blocks for each distinct input seen.

    Raises:
        ValueError: a block has a parameter that requires grad.
    """
    blocks = list(blocks)
    for block in blocks:
        trainable = [name for name, p in block.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"{type(block).__name__} has trainable parameters ({trainable[0]}, ...); "
                             "only frozen blocks can share a pass between branches")
    stats = SharedPassStats()
    patched = []
    for block in blocks:
        if "forward" in vars(block):
            raise ValueError(f"{type(block).__name__} already has its forward replaced; nested sharing is not supported")
        patched.append(block)
        block.forward = _memoised(block.forward, stats)
    try:
        yield stats
    finally:
        for block in patched:
            del block.forward


def _memoised(forward, stats: SharedPassStats):
    entries: list[tuple[tuple, dict, Any]] = []

    def shared_forward(*args, **kwargs):
        if _requires_grad(args) or _requires_grad(kwargs):
            stats.runs += 1
            return forward(*args, **kwargs)
        for old_args, old_kwargs, output in entries:
            if same_inputs(old_args, args) and same_inputs(old_kwargs, kwargs):
                stats.hits += 1
                return output
        stats.runs += 1
        output = forward(*args, **kwargs)
        entries.append((args, kwargs, output))
        return output

    return shared_forward
