"""Image folders: captions (sidecar, metadata), conditioning images, skips and their counts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from source_helpers import RES, check_record, encode, rgb  # noqa: E402

from condistill.data import EmptySourceError, ImageFolderSource  # noqa: E402


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "cond").mkdir()
    rgb(48, 40).save(root / "a.png")
    (root / "a.txt").write_text("a red square\n", encoding="utf-8")
    rgb(40, 40, (0, 0, 200)).save(root / "sub" / "b.jpg")
    Image.new("L", (40, 40), 90).save(root / "gray.png")
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(root / "alpha.png")
    Image.fromarray(np.full((40, 40), 60000, np.uint16)).save(root / "deep16.png")
    rgb(8, 8).save(root / "tiny.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    jpeg = encode(Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)), "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("RGB", (48, 40), (0, 255, 0)).save(root / "cond" / "a_edges.png")
    (root / ".hidden").mkdir()
    rgb(40, 40).save(root / ".hidden" / "ignored.png")
    rows = [
        {"file_name": "sub/b.jpg", "text": "a blue square", "score": 7},
        {"file_name": "a.png", "conditioning_file_name": "cond/a_edges.png"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return root


def test_image_folder_records_captions_conditioning_and_counts(image_folder: Path):
    source = ImageFolderSource(image_folder, RES)
    assert len(source) == 8  # conditioning image and hidden folder excluded
    records = {r.key: r for r in source}
    for record in records.values():
        check_record(record)
    assert sorted(records) == ["a.png", "alpha.png", "deep16.png", "gray.png", "sub/b.jpg"]
    assert records["a.png"].caption == "a red square"  # sidecar (metadata row has no text)
    assert records["sub/b.jpg"].caption == "a blue square"  # metadata.jsonl
    assert records["sub/b.jpg"].attributes["metadata"] == {"score": 7}
    assert records["gray.png"].caption == ""
    assert records["a.png"].conditioning.getpixel((5, 5)) == (0, 255, 0)
    assert records["alpha.png"].image.getpixel((3, 3)) == (255, 255, 255)
    assert records["deep16.png"].image.getpixel((3, 3)) == (233, 233, 233)
    stats = source.stats
    assert stats.skipped == {"corrupt": 1, "truncated": 1, "too_small": 1}
    assert stats.converted["grayscale"] == 1 and stats.converted["rgba"] == 1 and stats.converted["16bit"] == 1
    assert (stats.seen, stats.yielded) == (8, 5)
    assert "too_small=1" in stats.summary()
    # a second pass gives the same records and does not double count
    assert [r.key for r in source] == list(records)
    assert stats.seen == 8


def test_image_folder_random_access_returns_none_for_skipped(image_folder: Path):
    source = ImageFolderSource(image_folder, RES)
    keys = [source._key(i) for i in range(len(source))]
    assert source.load(keys.index("corrupt.png")) is None
    assert source.load(keys.index("a.png")).key == "a.png"
    with pytest.raises(IndexError):
        source.load(len(source))


def test_image_folder_caption_column_errors_and_choice(tmp_path: Path):
    rgb(40, 40).save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "caption": "hello"}) + "\n")
    with pytest.raises(KeyError) as info:
        ImageFolderSource(tmp_path, RES)
    assert "'caption'" in str(info.value) and "caption_column" in str(info.value)
    (record,) = list(ImageFolderSource(tmp_path, RES, caption_column="caption"))
    assert record.caption == "hello"
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png"}\n{broken\n')
    with pytest.raises(ValueError, match="line 2"):
        ImageFolderSource(tmp_path, RES)


def test_image_folder_empty_and_all_bad(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(tmp_path / "nope", RES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError, match="No image files"):
        ImageFolderSource(tmp_path / "empty", RES)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "one.png").write_bytes(b"junk")
    rgb(4, 4).save(bad / "two.png")
    source = ImageFolderSource(bad, RES)
    with pytest.raises(EmptySourceError) as info:
        list(source)
    message = str(info.value)
    assert "is empty" in message and "corrupt=1" in message and "too_small=1" in message and "min_size" in message


def test_conditioning_follows_the_random_crop_and_half_size_maps_are_stretched(tmp_path: Path):
    arr = np.random.default_rng(3).integers(0, 255, (40, 120, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "img.png")
    Image.fromarray(arr).save(tmp_path / "same.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "img.png", "conditioning_file_name": "same.png"}) + "\n")
    crops = set()
    for seed in range(4):
        source = ImageFolderSource(tmp_path, RES, crop="random", seed=seed)
        (record,) = list(source)
        assert np.array_equal(np.asarray(record.conditioning), np.asarray(record.image))
        crops.add(np.asarray(record.image).tobytes())
    assert len(crops) > 1
    # a conditioning image at half the size covers the same scene: stretched, then cropped
    xx, yy = np.meshgrid(np.linspace(0, 255, 120), np.linspace(0, 255, 40))
    smooth = np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "img.png")
    Image.fromarray(smooth).resize((60, 20), Image.Resampling.BILINEAR).save(tmp_path / "same.png")
    (record,) = list(ImageFolderSource(tmp_path, RES))
    diff = np.abs(np.asarray(record.conditioning, np.float32) - np.asarray(record.image, np.float32))
    assert record.conditioning.size == (RES, RES) and diff.max() < 6  # a 10-pixel shift gives 11
