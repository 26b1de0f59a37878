"""Control images that the data brings, in every source format: read, fitted with their image, and skipped
(and counted) when missing or of another shape."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from source_helpers import RES, check_record, encode, rgb  # noqa: E402

from condistill.data import open_source  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_webdataset import write_shard  # noqa: E402


def _pairs(folder: Path, controls: Path):
    """Three images; a's control fits, b has none, c's control has another shape."""
    folder.mkdir(parents=True)
    controls.mkdir(parents=True, exist_ok=True)
    for name in "abc":
        rgb(48, 40, (200, 30, 30)).save(folder / f"{name}.png")
    # a control of the same shape at another size (stretched), as a jpg: the stem matches
    rgb(96, 80, (0, 255, 0)).save(controls / "a.jpg")
    rgb(40, 48, (0, 0, 255)).save(controls / "c.png")


def test_a_parallel_folder_of_control_images(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "controls")
    source = open_source(str(tmp_path / "images"), resolution=RES, conditioning="required",
                         conditioning_dir=str(tmp_path / "controls"))
    records = list(source)
    assert [r.key for r in records] == ["a.png"]
    check_record(records[0])
    assert np.asarray(records[0].conditioning)[..., 1].min() > 240  # the green control, fitted with its image
    assert dict(source.stats.skipped) == {"missing_conditioning": 1, "mismatched_conditioning": 1}
    assert "give every image its control image" in str(source.stats.empty_error())
    # a condition that does not take control images reads the same folder without skipping
    assert len(list(open_source(str(tmp_path / "images"), resolution=RES,
                                conditioning_dir=str(tmp_path / "controls")))) == 2


def test_a_control_folder_inside_the_image_folder_holds_no_training_images(tmp_path):
    _pairs(tmp_path / "images", tmp_path / "images" / "control")
    source = open_source(str(tmp_path / "images"), resolution=RES, conditioning="optional",
                         conditioning_dir=str(tmp_path / "images" / "control"))
    assert sorted(r.key for r in source) == ["a.png", "b.png"]  # c is mismatched; control/* are not images
    with pytest.raises(FileNotFoundError, match="conditioning_dir .* is not a folder"):
        open_source(str(tmp_path / "images"), resolution=RES, conditioning_dir=str(tmp_path / "nope"))


def test_a_datasets_folder_with_diffusers_controlnet_columns(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [rgb(40, 40), rgb(40, 40)], "conditioning_image": [rgb(40, 40, (9, 9, 9)), None],
                                "text": ["one", "two"]}, features=features).save_to_disk(tmp_path / "saved")
    source = open_source(str(tmp_path / "saved"), resolution=RES, conditioning="required")
    records = list(source)
    assert [r.caption for r in records] == ["one"] and records[0].conditioning.getpixel((0, 0)) == (9, 9, 9)
    assert dict(source.stats.skipped) == {"missing_conditioning": 1}
    with pytest.raises(KeyError, match="no column 'x'"):
        open_source(str(tmp_path / "saved"), resolution=RES, conditioning="required", conditioning_column="x")


def test_webdataset_shards_with_a_control_member(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [
        ("k0", {"png": encode(rgb(40, 40)), "txt": b"zero", "conditioning.png": encode(rgb(40, 40, (1, 2, 3)))}),
        ("k1", {"png": encode(rgb(40, 40)), "txt": b"one"}),
    ])
    source = open_source(str(shard), resolution=RES, conditioning="required")
    records = list(source)
    assert [r.caption for r in records] == ["zero"] and records[0].conditioning.getpixel((5, 5)) == (1, 2, 3)
    assert dict(source.stats.skipped) == {"missing_conditioning": 1}


def test_a_wrong_conditioning_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="conditioning must be None, 'required' or 'optional'"):
        open_source("synthetic", resolution=RES, conditioning="yes")
