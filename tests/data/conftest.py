"""Shared by the latent cache tests: the embedded tiny teacher, and caches of the ``sr`` condition written with it."""
from __future__ import annotations

from pathlib import Path

import pytest

TEACHER = "embedded:tiny-teacher"


@pytest.fixture(scope="module")
def base():
    """The embedded tiny teacher, loaded once per module."""
    from condistill.frozen import load_base

    return load_base(TEACHER)


@pytest.fixture(scope="module")
def sr_cache_of(base):
    """``write(out, data, seed, **options)``: the ``sr`` cache of the data spec ``data``, quietly."""
    from condistill.conditions import get_condition
    from condistill.data import open_source
    from condistill.data.cache_writer import write_cache

    def write(out: Path, data: str, seed: int, **options) -> Path:
        return write_cache(out, base=base, condition=get_condition("sr"), source=open_source(data, resolution=base.resolution),
                           seed=seed, data_spec=data, log=lambda message: None, **options)
    return write
