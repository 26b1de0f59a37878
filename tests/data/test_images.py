"""Image sanitising: mode conversion, crops, skips of small, corrupt and truncated images."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from source_helpers import RES, encode, rgb  # noqa: E402

from condistill.data import ImageSanitizer, to_rgb  # noqa: E402
from condistill.data.images import crop_box, open_image  # noqa: E402
from condistill.data.skips import SkipItem  # noqa: E402


def test_to_rgb_converts_every_mode_and_names_it():
    cases = {
        "grayscale": Image.new("L", (4, 4), 100),
        "rgba": Image.new("RGBA", (4, 4), (255, 0, 0, 0)),
        "grayscale_alpha": Image.new("LA", (4, 4), (0, 0)),
        "cmyk": Image.new("CMYK", (4, 4), (0, 255, 255, 0)),
        "16bit": Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16)),
        "float": Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)),
    }
    expected = {
        "grayscale": (100, 100, 100),
        "rgba": (255, 255, 255),  # fully transparent -> white background
        "grayscale_alpha": (255, 255, 255),
        "cmyk": (255, 0, 0),
        "16bit": (100, 100, 100),
        "float": (128, 128, 128),
    }
    for reason, image in cases.items():
        notes: list[str] = []
        out = to_rgb(image, notes)
        assert out.mode == "RGB", reason
        assert notes == [reason]
        assert out.getpixel((1, 1)) == expected[reason], reason


def test_to_rgb_composites_partial_alpha_on_white_and_keeps_rgb():
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    r, g, b = to_rgb(half).getpixel((0, 0))
    assert 125 <= r <= 129 and r == g == b
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([10, 20, 30] * 256)
    notes: list[str] = []
    assert to_rgb(palette, notes).getpixel((0, 0)) == (10, 20, 30) and notes == ["palette"]
    plain = rgb(3, 3)
    notes = []
    assert to_rgb(plain, notes) is plain and notes == []


def test_center_crop_keeps_the_middle_of_a_wide_image():
    # 200x100: red | green | blue in columns [0,50), [50,150), [150,200)
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50] = (255, 0, 0)
    arr[:, 50:150] = (0, 255, 0)
    arr[:, 150:] = (0, 0, 255)
    prepared = ImageSanitizer(RES).prepare(Image.fromarray(arr), "wide")
    out = np.asarray(prepared.image)
    assert out.shape == (RES, RES, 3)
    assert (out[:, 2:-2, 1] > 200).all() and (out[:, 2:-2, 0] < 50).all()
    assert prepared.box == pytest.approx((50.0, 0.0, 150.0, 100.0))
    # a tall image: the box spans the full width and the vertical middle
    assert crop_box((60, 120), 30) == pytest.approx((0.0, 30.0, 60.0, 90.0))


def test_random_crop_is_deterministic_per_seed_and_key():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 160, 3), dtype=np.uint8))
    boxes = {seed: ImageSanitizer(RES, crop="random", seed=seed).prepare(image, "k").box for seed in range(8)}
    again = ImageSanitizer(RES, crop="random", seed=3).prepare(image, "k")
    assert again.box == boxes[3]
    assert len(set(boxes.values())) > 1
    for box in boxes.values():
        assert box[0] >= 0 and box[2] <= 160 and box[2] - box[0] == pytest.approx(40)


def test_sanitizer_skips_small_corrupt_and_truncated_and_rejects_bad_options(tmp_path):
    sanitizer = ImageSanitizer(64)  # min_size 32
    with pytest.raises(SkipItem) as info:
        sanitizer.prepare(rgb(20, 50), "small")
    assert info.value.reason == "too_small"
    prepared = sanitizer.prepare(rgb(40, 40), "upscaled")
    assert prepared.image.size == (64, 64) and "upscaled" in prepared.conversions
    with pytest.raises(SkipItem) as info:
        open_image(b"definitely not an image")
    assert info.value.reason == "corrupt"
    jpeg = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(SkipItem) as info:
        open_image(jpeg[: len(jpeg) // 2])
    assert info.value.reason == "truncated"
    with pytest.raises(SkipItem) as info:
        open_image(tmp_path / "missing.png")
    assert info.value.reason == "missing_file"
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageSanitizer(64, crop="middle")
    with pytest.raises(ValueError, match="resolution must be a positive int"):
        ImageSanitizer(0)


def test_large_jpeg_is_drafted_but_still_correct():
    arr = np.zeros((800, 1200, 3), np.uint8)
    arr[:, :, 2] = 255
    out = ImageSanitizer(RES).prepare(encode(Image.fromarray(arr), "JPEG"), "big")
    assert out.image.size == (RES, RES)
    assert np.asarray(out.image)[..., 2].min() > 240
