"""Small helpers shared across the package: JSON-ready copies and parameter counts."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

__all__ = ["NotJSONSerialisableError", "jsonable", "count_parameters"]


class NotJSONSerialisableError(ValueError, TypeError):
    """A value JSON cannot represent (both a ValueError and, as before for condition options, a TypeError)."""


def _plain(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def jsonable(value: Any, what: str = "value") -> Any:
    """A JSON-ready copy of ``value``: tuples become lists, NumPy scalars and arrays plain numbers.

    Raises:
        NotJSONSerialisableError: ``value`` holds something JSON cannot represent; the message names ``what``.
    """
    try:
        return json.loads(json.dumps(value, default=_plain))
    except (TypeError, ValueError) as error:
        raise NotJSONSerialisableError(f"{what} must be JSON-serialisable (plain dicts, lists, numbers, strings): {error}") from None


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of ``module`` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
