"""Every random stream of condistill, derived from the run's seed in one place.

A stream is named by a tuple of non-negative integers: the run's seed first, then what the
stream is for (a salt, a split, an index, a crc32 of a text key). Two rules derive from it:

* NumPy streams and integer seeds mix the whole tuple with ``numpy.random.SeedSequence``
  (:func:`numpy_rng`, :func:`derive_seed`), so neighbouring seeds and indices give unrelated
  draws;
* torch streams (:func:`torch_generator`) are seeded ``seed * stride + index``, with one stride
  per stream (:data:`BATCH_ORDER_STRIDE`, :data:`STEP_STRIDE`). They are the training loop's
  batch order and per-step draws; their seeds stay linear in ``(seed, step)`` so that every
  recorded run and resumed run replays bit-identically.

Item ``i`` of a dataset, step ``k`` of a run and scene ``j`` of a split are therefore pure
functions of the seed, whatever process, worker or resume computes them.
"""
from __future__ import annotations

import random
import zlib

import numpy as np
import torch

__all__ = ["BATCH_ORDER_STRIDE", "STEP_STRIDE", "derive_seed", "global_rng_state", "numpy_rng", "set_global_rng_state",
           "text_key", "torch_generator"]

#: stride of the per-epoch permutation of the training data
BATCH_ORDER_STRIDE = 7919
#: stride of the per-micro-step draws (noise, grid index, caption dropout, guidance scale)
STEP_STRIDE = 1_000_003


def _check(keys: tuple) -> list[int]:
    out = []
    for k in keys:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {keys!r}")
        out.append(int(k))
    if not out:
        raise ValueError("a random stream needs at least one key (the seed)")
    return out


def numpy_rng(*keys: int) -> np.random.Generator:
    """A NumPy generator that depends only on ``keys`` (``default_rng(SeedSequence(keys))``)."""
    return np.random.default_rng(_check(keys))


def derive_seed(*keys: int) -> int:
    """An integer seed in ``[0, 2**31)`` that depends only on ``keys`` (SeedSequence mixing)."""
    return int(np.random.SeedSequence(_check(keys)).generate_state(1)[0] >> 1)


def text_key(text: str) -> int:
    """A stable integer key for a text (crc32 of its UTF-8 bytes), e.g. an image's file key."""
    return zlib.crc32(text.encode("utf-8"))


def torch_generator(seed: int, index: int = 0, stride: int = 1) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded ``seed * stride + index`` (``seed`` may be negative, as
    ``torch.manual_seed`` allows; ``index`` and ``stride`` may not)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"a torch seed must be an integer, got {seed!r}")
    index, stride = _check((index, stride))
    return torch.Generator().manual_seed(int(seed) * stride + index)


def global_rng_state() -> dict:
    """The global Python, NumPy, torch (and CUDA) generator states, as tensors and plain containers."""
    np_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    """Restore what :func:`global_rng_state` returned."""
    import ast

    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
