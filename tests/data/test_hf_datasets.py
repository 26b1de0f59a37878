"""Hugging Face datasets: save_to_disk folders, DatasetDict splits, bad cells, local parquet."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from source_helpers import RES, check_record, encode, rgb  # noqa: E402

from condistill.data import HFDatasetSource, open_source  # noqa: E402


def _hf_dataset(n: int = 3):
    import datasets

    images = [rgb(40 + 8 * i, 40) for i in range(n)]
    depth = [Image.fromarray(np.full((40, 40 + 8 * i), 128, np.uint8)) for i in range(n)]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "cond": datasets.Image(), "depth": datasets.Image()}
    )
    return datasets.Dataset.from_dict(
        {"image": images, "text": [f"caption {i}" for i in range(n)], "cond": images, "depth": depth}, features=features
    )


def test_hf_save_to_disk_records_depth_and_conditioning(tmp_path: Path):
    folder = tmp_path / "saved"
    _hf_dataset().save_to_disk(folder)
    source = open_source(str(folder), resolution=RES, conditioning_column="cond", depth_column="depth")
    assert isinstance(source, HFDatasetSource) and len(source) == 3
    records = list(source)
    for i, record in enumerate(records):
        check_record(record)
        assert record.caption == f"caption {i}" and record.key == str(i)
        assert record.depth == pytest.approx(np.full((RES, RES), 128 / 255, np.float32), abs=1e-4)
    no_captions = HFDatasetSource(folder, caption_column=None, resolution=RES)
    assert next(iter(no_captions)).caption == ""


def test_hf_missing_column_lists_available_columns(tmp_path: Path):
    folder = tmp_path / "saved"
    _hf_dataset(1).save_to_disk(folder)
    with pytest.raises(KeyError) as info:
        HFDatasetSource(folder, caption_column="caption", resolution=RES)
    message = str(info.value)
    assert "'caption'" in message and "['image', 'text', 'cond', 'depth']" in message and "caption_column" in message
    with pytest.raises(KeyError, match="image_column"):
        HFDatasetSource(folder, image_column="pixels", resolution=RES)


def test_hf_dataset_dict_split_and_bad_cells(tmp_path: Path):
    import datasets

    good = encode(rgb(40, 40))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    train = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": good, "path": None}, {"bytes": b"corrupt", "path": None}, {"bytes": encode(rgb(5, 5)), "path": None}],
            "text": ["ok", "bad", "small"],
        },
        features=features,
    )
    paths = tmp_path / "p.png"
    rgb(40, 40).save(paths)
    test = datasets.Dataset.from_dict({"image": [str(paths)], "text": ["from a path string"]})
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(folder)

    source = HFDatasetSource(folder, resolution=RES)
    assert [r.caption for r in source] == ["ok"]
    assert source.stats.skipped == {"corrupt": 1, "too_small": 1}
    (record,) = list(HFDatasetSource(folder, split="test", resolution=RES))
    check_record(record)
    assert record.caption == "from a path string"
    with pytest.raises(KeyError, match=r"available splits: \['test', 'train'\]"):
        HFDatasetSource(folder, split="validation", resolution=RES)


def test_hf_load_dataset_from_local_parquet_folder(tmp_path: Path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    _hf_dataset(2).to_parquet(str(folder / "train-00000.parquet"))
    source = open_source(str(folder), resolution=RES, cache_dir=str(tmp_path / "cache"))
    assert isinstance(source, HFDatasetSource)
    assert [r.caption for r in source] == ["caption 0", "caption 1"]
