"""Shared helpers of the data-source tests: tiny images, encoded bytes, the record schema check."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from condistill.data import Record

RES = 32


def rgb(w: int, h: int, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def check_record(record: Record, res: int = RES) -> None:
    assert isinstance(record, Record)
    assert record.image.mode == "RGB"
    assert record.image.size == (res, res)
    assert isinstance(record.caption, str)
    assert isinstance(record.key, str) and record.key
    if record.conditioning is not None:
        assert record.conditioning.mode == "RGB" and record.conditioning.size == (res, res)
    if record.depth is not None:
        assert record.depth.dtype == np.float32 and record.depth.shape == (res, res)
        assert 0.0 <= record.depth.min() and record.depth.max() <= 1.0
