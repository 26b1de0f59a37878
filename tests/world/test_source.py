"""The synthetic source: records and keys of the built-in scenes, the synthetic spec and its errors."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from source_helpers import RES, check_record  # noqa: E402

from condistill.data import open_source  # noqa: E402
from condistill.world.source import SyntheticSource  # noqa: E402


def test_synthetic_source_records():
    source = open_source("synthetic:heldout:3", resolution=RES, seed=5)
    assert isinstance(source, SyntheticSource) and len(source) == 3
    records = list(source)
    for record in records:
        check_record(record)
        assert record.caption
        assert record.masks is not None and record.masks.dtype == bool and record.masks.shape[1:] == (RES, RES)
        assert record.attributes["split"] == "heldout"
    assert records[0].key == "synthetic-heldout-5-0000000"
    train = open_source("synthetic", resolution=RES, size=2)
    assert train.split == "train" and len(train) == 2
    assert np.asarray(list(train)[0].image).tobytes() != np.asarray(records[0].image).tobytes()


def test_synthetic_spec_errors():
    with pytest.raises(ValueError, match="not an integer"):
        open_source("synthetic:train:many")
    with pytest.raises(ValueError, match="unknown synthetic split"):
        open_source("synthetic:valid")
    with pytest.raises(ValueError, match=r"accepted options: .*seed.*size"):
        open_source("synthetic", colour="red")
    with pytest.raises(ValueError, match="given twice"):
        open_source("synthetic:train:4", size=5)
