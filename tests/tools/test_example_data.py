"""The repository's data/ folder: every example source opens, carries what its README says, and trains."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from condistill.data.sources import open_source

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.mark.parametrize("name,count,options", [
    ("images", 8, {}), ("shards/train-000000.tar", 8, {}), ("paired", 8, {}), ("validation", 4, {}),
    ("paired-folder/images", 8, {"conditioning_dir": str(DATA / "paired-folder" / "control")}),
])
def test_each_example_source_opens_with_captions_and_the_paired_ones_with_control_images(name, count, options):
    records = list(open_source(str(DATA / name), resolution=64, **options))
    assert len(records) == count
    assert all(r.caption and r.image.size == (64, 64) for r in records)
    # control images are read for a condition that takes them, or where the options say where they are
    assert all((r.conditioning is not None) == bool(options) for r in records)
    if name != "validation" and name != "images":
        paired = list(open_source(str(DATA / name), resolution=64, conditioning="required", **options))
        assert len(paired) == count and all(r.conditioning.size == (64, 64) for r in paired)


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


def _readme_commands() -> list[str]:
    """The commands of data/README.md's bash block."""
    text = (DATA / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_shows_a_paired_command_for_each_paired_form():
    commands = _readme_commands()
    assert len(commands) == 3 and all(c.startswith("condistill train paired --data data/") for c in commands)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(3))
def test_each_readme_paired_command_trains_and_its_export_loads_and_evaluates(index, tmp_path, monkeypatch, capsys):
    """data/README.md's paired commands as written, for two steps; the export loads with the control type it
    was given and samples from a control image taken as it is, and `condistill eval --data` scores it."""
    import json
    import shlex

    from condistill import load_adapter
    from condistill.cli import main

    monkeypatch.chdir(DATA.parent)
    words = shlex.split(_readme_commands()[index])
    out = tmp_path / "run"
    assert main(words[1:] + ["--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                             "--validate-every", "0", "--checkpoint-every", "0", "--threads", "1"]) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped"] == 0 and report["usable"] >= 2
    pipe = load_adapter(str(out))
    condition = pipe.condistill_condition
    assert condition.name == "paired" and condition.control_type == ("canny edges" if index == 0 else "control")
    control = condition.control_image(Image.open(DATA / "paired-folder" / "control" / "scene-000.png"))
    image = pipe("a red circle", image=control, **pipe.condistill_defaults).images[0]
    assert image.size == (64, 64)
    data_options = words[words.index("--data-options") + 1:][:1] if "--data-options" in words else []
    assert main(["eval", "--condition", "paired", "--student", str(out), "--data", words[4], "--num-images", "2",
                 "--batch-size", "2", "--out", str(tmp_path / "eval"), *(["--data-options"] + data_options
                                                                         if data_options else [])]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert {"psnr", "ssim"} <= set(rows[0]["metrics"])
