"""The repository's data/ folder: every example source opens, carries what its README says, and trains."""
from __future__ import annotations

from pathlib import Path

import pytest

from condistill.data.sources import open_source

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.mark.parametrize("name,count", [("images", 8), ("shards/train-000000.tar", 8), ("paired", 8),
                                        ("validation", 4)])
def test_each_example_source_opens_with_captions(name, count):
    options = {"conditioning_column": "conditioning_image"} if name == "paired" else {}
    records = list(open_source(str(DATA / name), resolution=64, **options))
    assert len(records) == count
    assert all(r.caption and r.image.size == (64, 64) for r in records)
    assert all((r.conditioning is not None) == (name == "paired") for r in records)


def test_the_folder_and_shard_hold_the_same_scenes():
    folder = [r.caption for r in open_source(str(DATA / "images"), resolution=64)]
    shard = [r.caption for r in open_source(str(DATA / "shards/train-000000.tar"), resolution=64)]
    assert sorted(folder) == sorted(shard)


@pytest.mark.slow
@pytest.mark.parametrize("data,options", [
    ("data/images", []),
    ("data/shards/train-000000.tar", []),
    ("data/paired", ["--data-options", '{"conditioning_column": "conditioning_image"}',
                     "--condition-options", '{"use_record_conditioning": true}']),
])
def test_an_edge_run_trains_on_each_example_source(data, options, tmp_path, monkeypatch):
    """As data/README.md says: two steps of the edge recipe on the embedded teacher, the paired source's own
    control images used as they are."""
    from condistill.cli import main

    monkeypatch.chdir(DATA.parent)
    out = tmp_path / "run"
    argv = ["train", "edge", "--data", data, "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
            "--validate-every", "0", "--checkpoint-every", "0", "--threads", "1", *options]
    assert main(argv) == 0
    assert (out / "adapter" / "condistill_config.json").is_file()
