"""ConditionDataset: tensors, per-item seeds, determinism, skipped items, collate."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from condistill.data import (
    ConditionDataset,
    EmptySourceError,
    ImageFolderSource,
    Record,
    WebDatasetSource,
    collate,
)
from condistill.seeding import derive_seed
from condistill.world.source import SyntheticSource

RES = 32


class GrayCondition:
    """Deterministic: the image's luminance as one channel."""

    channels = 1

    def __call__(self, record: Record, seed: int) -> torch.Tensor:
        gray = np.asarray(record.image.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(gray)[None]


class NoiseCondition:
    """Random: uniform noise drawn from the seed; remembers the seeds it was given."""

    channels = 3

    def __init__(self):
        self.seeds: list[int] = []

    def __call__(self, record: Record, seed: int) -> torch.Tensor:
        self.seeds.append(seed)
        generator = torch.Generator().manual_seed(seed)
        h, w = record.image.size[1], record.image.size[0]
        return torch.rand(3, h, w, generator=generator)


class WrongShapeCondition:
    channels = 3

    def __call__(self, record: Record, seed: int) -> torch.Tensor:
        return torch.zeros(1, RES, RES)


def test_items_have_the_documented_tensors():
    source = SyntheticSource(size=3, resolution=RES)
    dataset = ConditionDataset(source, GrayCondition(), RES, seed=0)
    assert len(dataset) == 3
    item = dataset[1]
    assert set(item) == {"pixel_values", "conditioning", "caption", "key"}
    pixels, cond = item["pixel_values"], item["conditioning"]
    assert pixels.dtype == torch.float32 and pixels.shape == (3, RES, RES)
    assert cond.dtype == torch.float32 and cond.shape == (1, RES, RES)
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0 and 0.0 <= cond.min() and cond.max() <= 1.0
    record = source.load(1)
    expected = torch.from_numpy(np.asarray(record.image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(pixels, expected)
    assert item["caption"] == record.caption and item["key"] == record.key
    assert dataset[-1]["key"] == source.load(2).key
    with pytest.raises(IndexError):
        dataset[3]


def test_per_item_seeds_are_deterministic_and_distinct():
    source = SyntheticSource(size=4, resolution=RES)
    condition = NoiseCondition()
    first = ConditionDataset(source, condition, seed=7)
    a = [first[i]["conditioning"] for i in range(4)]
    assert condition.seeds == [derive_seed(7, i) for i in range(4)]
    assert len(set(condition.seeds)) == 4
    again = ConditionDataset(SyntheticSource(size=4, resolution=RES), NoiseCondition(), seed=7)
    for i in range(4):
        assert torch.equal(a[i], again[i]["conditioning"])
        assert torch.equal(a[i], first[i]["conditioning"])  # repeated access
    other = ConditionDataset(source, NoiseCondition(), seed=8)
    assert not torch.equal(a[0], other[0]["conditioning"])
    assert derive_seed(0, 1) != derive_seed(1, 0) and 0 <= derive_seed(2**40, 5) < 2**31


def test_collate_and_dataloader():
    dataset = ConditionDataset(SyntheticSource(size=5, resolution=RES), NoiseCondition(), seed=1)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate))
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 1]
    batch = batches[0]
    assert batch["conditioning"].shape == (2, 3, RES, RES)
    assert batch["caption"] == [dataset[0]["caption"], dataset[1]["caption"]]
    assert batch["key"] == [dataset[0]["key"], dataset[1]["key"]]
    assert torch.equal(batch["conditioning"][1], dataset[1]["conditioning"])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_skipped_items_are_replaced_by_the_next_usable_one(tmp_path: Path):
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"corrupt")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "c.png")
    source = ImageFolderSource(tmp_path, RES)
    dataset = ConditionDataset(source, GrayCondition(), seed=0)
    assert len(dataset) == 3
    assert [dataset[i]["key"] for i in range(3)] == ["a.png", "c.png", "c.png"]
    assert source.stats.skipped["corrupt"] == 1

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"junk")
    with pytest.raises(EmptySourceError, match="corrupt=1"):
        ConditionDataset(ImageFolderSource(bad, RES), GrayCondition())[0]


def test_stream_source_is_materialised_once(tmp_path: Path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("k0", "k1"):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dataset = ConditionDataset(WebDatasetSource(shard, RES), GrayCondition())
    assert len(dataset) == 2
    assert [dataset[i]["caption"] for i in range(2)] == ["k0", "k1"]


def test_plain_records_are_fitted_and_bad_inputs_rejected():
    records = [Record(image=Image.new("L", (64, 48), 50), caption="gray", key="r0")]
    dataset = ConditionDataset(records, GrayCondition(), resolution=RES)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, RES, RES) and item["caption"] == "gray"
    with pytest.raises(ValueError, match="resolution is required"):
        ConditionDataset(records, GrayCondition())
    with pytest.raises(ValueError, match="open the source with resolution=16"):
        ConditionDataset(SyntheticSource(size=1, resolution=RES), GrayCondition(), resolution=16)
    with pytest.raises(TypeError, match="channels"):
        ConditionDataset(records, lambda record, seed: None, resolution=RES)
    with pytest.raises(ValueError, match="returned shape"):
        ConditionDataset(records, WrongShapeCondition(), resolution=RES)[0]
    with pytest.raises(ValueError, match="non-negative"):
        ConditionDataset(records, GrayCondition(), resolution=RES, seed=-1)
