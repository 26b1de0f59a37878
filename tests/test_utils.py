"""condistill.utils: the one JSON helper and the parameter count."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from condistill.utils import count_parameters, jsonable


def test_jsonable_converts_tuples_and_numpy_scalars():
    out = jsonable({"a": (1, 2), "b": np.float32(0.5), "c": np.int64(3), "d": np.arange(2), "e": None})
    assert out == {"a": [1, 2], "b": 0.5, "c": 3, "d": [0, 1], "e": None}
    assert type(out["c"]) is int


def test_jsonable_names_what_failed():
    with pytest.raises(ValueError, match="condition option x must be JSON-serialisable"):
        jsonable({"f": object()}, "condition option x")
    with pytest.raises(TypeError):  # what a bad condition option raised before the helper was shared
        jsonable(object(), "condition option y")


def test_count_parameters():
    assert count_parameters(torch.nn.Linear(3, 2)) == 8
