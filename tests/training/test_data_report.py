"""No silent skips in a training run: data_report.json, the summary, the stop on too many skips (tiny base)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from condistill.data.skips import TooManySkipsError
from condistill.training.loop import distill
from helpers import tiny_run_config as _cfg
from source_helpers import encode, rgb


def _write_bad(path: Path, kind: str) -> None:
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG not really")
    elif kind == "truncated":
        png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)))
        path.write_bytes(png[: len(png) // 2])
    elif kind == "too_small":
        rgb(4, 4).save(path)  # the tiny base is 16 px: min_size is 8


def _folder(root: Path, kinds: list[str]) -> Path:
    """Image ``i`` is ``NN_<kind>.png``, good (20x20) or bad; a ``missing_file`` is a metadata row only."""
    root.mkdir()
    rows = []
    for i, kind in enumerate(kinds):
        path = root / f"{i:02d}_{kind}.png"
        if kind == "good":
            rgb(20, 20, (20 * i, 100, 0)).save(path)
        elif kind == "missing_file":
            rows.append({"file_name": path.name, "text": "gone"})
        else:
            _write_bad(path, kind)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _reasons(report):
    return {(item["key"], item["reason"]) for item in report["skipped_items"]}


def test_skips_are_listed_in_the_report_and_summarised(tiny_base, tmp_path, caplog):
    # 8 items, 2 steps of 4: one epoch, every item is read
    kinds = ["good", "corrupt", "good", "truncated", "good", "too_small", "good", "missing_file"]
    data = _folder(tmp_path / "images", kinds)
    losses = {}
    for workers in (0, 2):
        with caplog.at_level("WARNING", logger="condistill.data.report"):
            caplog.clear()
            out = distill(_cfg(tiny_base, tmp_path / f"run{workers}", data=str(data), max_skip_fraction=0.6,
                               num_workers=workers))
        report = json.loads((out / "data_report.json").read_text())
        assert (report["seen"], report["usable"], report["skipped"]) == (8, 4, 4)
        assert report["skipped_by_reason"] == {"corrupt": 1, "missing_file": 1, "too_small": 1, "truncated": 1}
        assert _reasons(report) == {("01_corrupt.png", "corrupt"), ("03_truncated.png", "truncated"),
                                    ("05_too_small.png", "too_small"), ("07_missing_file.png", "missing_file")}
        assert all(item["detail"] for item in report["skipped_items"]) and report["skipped_items_not_listed"] == 0
        assert report["stopped"] is False and report["source"].startswith("ImageFolderSource(")
        messages = [r.getMessage() for r in caplog.records if r.name == "condistill.data.report"]
        assert sum("skipped data item" in m for m in messages) == 4
        summary = messages[-1]
        assert "4 of 8 items used" in summary and "missing_file=1" in summary and "too_small=1" in summary
        assert "fix the file names listed in the metadata" in summary and "data_report.json" in summary
        losses[workers] = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert losses[0] == losses[2]  # workers change neither the batches nor the counts


def test_mostly_bad_data_stops_the_run_with_the_report_and_keeps_the_checkpoint(tiny_base, tmp_path):
    # the sampler's first batch (items 4, 1, 7, 5) is good; 6 of the 10 items are bad
    kinds = ["corrupt", "good", "truncated", "too_small", "good", "good", "missing_file", "good", "corrupt", "too_small"]
    data = _folder(tmp_path / "images", kinds)
    out = tmp_path / "run"
    with pytest.raises(TooManySkipsError) as err:
        distill(_cfg(tiny_base, out, data=str(data), max_steps=3, checkpoint_every=1))
    text = str(err.value)
    for part in ("6 of the 10 data items seen", "60.0%", "max_skip_fraction=0.1", "corrupt=2 (e.g. 00_corrupt.png",
                 str(out / "data_report.json"), "--max-skip-fraction", "Fix or remove those files"):
        assert part in text
    report = json.loads((out / "data_report.json").read_text())
    assert report["stopped"] is True and (report["seen"], report["skipped"]) == (10, 6)
    assert _reasons(report) == {(f"{i:02d}_{k}.png", k) for i, k in enumerate(kinds) if k != "good"}
    assert not (out / "adapter").exists()  # no export of a run that stopped
    last = out / "checkpoints" / "step-0000002"
    assert load_file(str(last / "online.safetensors")) and load_file(str(last / "ema.safetensors"))


def test_a_clean_run_writes_a_report_with_no_skips(tiny_base, tmp_path):
    out = distill(_cfg(tiny_base, tmp_path / "run", max_steps=1))
    report = json.loads((out / "data_report.json").read_text())
    assert report["source"] == "SyntheticSource(split='train', size=24, seed=0)"
    assert report["seen"] == report["usable"] == 4  # one step of 4 items
    assert report["skipped"] == 0 and report["skipped_items"] == [] and report["skipped_by_reason"] == {}
    assert report["stopped"] is False
