"""No silent skips: the events a dataset hands over, the rate-limited lines, the report, the stop."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from condistill.data import ConditionDataset, ImageFolderSource, WebDatasetSource, collate
from condistill.data.dataset import DATA_EVENTS_KEY
from condistill.data.report import SkipMonitor
from condistill.data.skips import SkipItem, SourceStats, TooManySkipsError
from source_helpers import encode, rgb

RES = 16


class GrayCondition:
    channels = 1

    def __call__(self, record, seed):
        return torch.from_numpy(np.asarray(record.image.convert("L"), dtype=np.float32) / 255.0)[None]


def _skip_batch(stats: SourceStats, keys, reason="corrupt") -> dict:
    """A batch holding the events of skipping ``keys`` in a copy of the stats (as a worker would)."""
    stats.open_outbox()
    for key in keys:
        stats.observe(key, skipped=SkipItem(reason, f"bad {key}"))
    return {"pixel_values": torch.zeros(1), DATA_EVENTS_KEY: stats.drain()}


def test_skip_lines_are_rate_limited_first_five_then_powers_of_two():
    lines: list[str] = []
    monitor = SkipMonitor(SourceStats(name="demo"), max_skip_fraction=1.0, log=lines.append)
    worker = SourceStats(name="demo")
    batch = monitor.update(_skip_batch(worker, [f"k{i}" for i in range(40)]))
    assert DATA_EVENTS_KEY not in batch and set(batch) == {"pixel_values"}
    assert len(lines) == 8
    assert lines[0] == "demo: skipped data item k0 (corrupt: bad k0); 1 of 1 items seen skipped"
    assert "k4 (corrupt: bad k4)" in lines[4] and "8, 16, 32" in lines[4]
    assert [line.split(":")[1].split()[0] for line in lines[5:]] == ["8", "16", "32"]
    assert "latest: k31 (corrupt: bad k31)" in lines[7] and "corrupt=32" in lines[7]
    # the same keys seen again (another worker, another epoch) are neither counted nor reported
    other = SourceStats(name="demo")
    monitor.update(_skip_batch(other, [f"k{i}" for i in range(40)]))
    assert len(lines) == 8 and monitor.stats.skipped_total == 40


def test_lines_go_through_logging_by_default(caplog):
    monitor = SkipMonitor(SourceStats(name="demo"), max_skip_fraction=1.0)
    with caplog.at_level("WARNING", logger="condistill.data.report"):
        monitor.update(_skip_batch(SourceStats(name="demo"), ["x.png"]))
        monitor.finish()
    messages = [r.getMessage() for r in caplog.records if r.name == "condistill.data.report"]
    assert messages[0].startswith("demo: skipped data item x.png (corrupt: bad x.png)")
    assert "0 of 1 items used" in messages[1] and "corrupt=1" in messages[1]
    assert "re-export or remove the unreadable files" in messages[1]


def test_report_lists_skips_up_to_the_cap_and_counts_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr("condistill.data.skips.ITEM_LIST_CAP", 3)
    stats = SourceStats(name="demo")
    stats.observe("ok", ["rgba"])
    for key in "abcde":
        stats.observe(key, skipped=SkipItem("too_small", "4x4"))
    monitor = SkipMonitor(stats, max_skip_fraction=1.0, report_path=tmp_path / "data_report.json", log=lambda m: None)
    path = monitor.finish()
    report = json.loads(path.read_text())
    assert (report["source"], report["seen"], report["usable"], report["skipped"]) == ("demo", 6, 1, 5)
    assert report["skipped_by_reason"] == {"too_small": 5} and report["converted"] == {"rgba": 1}
    assert report["skipped_items"] == [{"key": k, "reason": "too_small", "detail": "4x4"} for k in "abc"]
    assert report["skipped_items_not_listed"] == 2
    assert report["stopped"] is False and report["skip_fraction"] == pytest.approx(5 / 6)
    assert report["advice"] == {"too_small": "lower min_size or use larger images"}


def test_too_many_skips_stop_with_the_report_after_enough_items(tmp_path):
    stats = SourceStats(name="demo")
    monitor = SkipMonitor(stats, max_skip_fraction=0.1, report_path=tmp_path / "data_report.json", log=lambda m: None)
    worker = SourceStats(name="demo")
    worker.open_outbox()
    for i in range(12):  # 3 bad among the first 12: below the 20 items needed, no stop yet
        worker.observe(f"k{i}", skipped=SkipItem("corrupt", "not an image") if i % 4 == 0 else None)
    monitor.update({DATA_EVENTS_KEY: worker.drain()})
    assert not (tmp_path / "data_report.json").exists()
    for i in range(12, 30):
        worker.observe(f"k{i}", skipped=SkipItem("too_small", "4x4") if i % 3 == 0 else None)
    with pytest.raises(TooManySkipsError) as err:
        monitor.update({DATA_EVENTS_KEY: worker.drain()})
    assert isinstance(err.value, ValueError)
    text = str(err.value)
    for part in ("9 of the 30 data items seen", "30.0%", "max_skip_fraction=0.1", "corrupt=3 (e.g. k0: not an image)",
                 "too_small=6 (e.g. k12: 4x4)", "data_report.json", "Fix or remove those files",
                 "lower min_size or use larger images", "--max-skip-fraction", "Checkpoints already written are kept"):
        assert part in text
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["stopped"] is True and report["seen"] == 30 and report["skipped"] == 9
    assert len(report["skipped_items"]) == 9


def test_a_source_smaller_than_min_seen_is_checked_once_fully_seen():
    stats = SourceStats(name="small")
    stats.observe("a", skipped=SkipItem("corrupt"))
    SkipMonitor(stats, total=None, log=lambda m: None).check()  # 1 item seen, 20 needed
    stats.observe("b")
    stats.observe("c", skipped=SkipItem("corrupt"))
    with pytest.raises(TooManySkipsError, match="2 of the 3 data items"):
        SkipMonitor(stats, total=3, log=lambda m: None).check()
    SkipMonitor(stats, total=3, max_skip_fraction=1.0, log=lambda m: None).check()  # 1 never stops


def _bad_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(6):
        rgb(20, 20, (40 * i, 0, 0)).save(root / f"good{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)))
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    rgb(4, 4).save(root / "tiny.png")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_the_counts_reach_the_main_process_from_workers(tmp_path, workers):
    folder = _bad_folder(tmp_path / "images")
    source = ImageFolderSource(folder, RES)
    dataset = ConditionDataset(source, GrayCondition())
    monitor = SkipMonitor.for_dataset(dataset, max_skip_fraction=1.0, log=lambda m: None)
    batches = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [8, 7, 0]]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate, num_workers=workers)
    plain = [collate([dataset[i] for i in b]) for b in batches]
    for batch, expected in zip(loader, plain):
        batch = monitor.update(batch)
        assert batch.keys() == expected.keys() and batch["key"] == expected["key"]
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    report = monitor.report()
    assert (report["seen"], report["usable"], report["skipped"]) == (9, 6, 3)
    assert {(s["key"], s["reason"]) for s in report["skipped_items"]} == {
        ("corrupt.png", "corrupt"), ("truncated.png", "truncated"), ("tiny.png", "too_small")}
    if workers == 0:
        assert report == {**source.stats.report(), **{k: report[k] for k in ("skip_fraction", "max_skip_fraction",
                                                                            "stopped")}}


def test_a_stream_source_is_checked_when_the_monitor_starts(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, data in [("k0", encode(rgb(20, 20))), ("k1", b"junk"), ("k2", b"junk")]:
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    lines: list[str] = []
    dataset = ConditionDataset(WebDatasetSource(shard, RES), GrayCondition())
    with pytest.raises(TooManySkipsError, match="2 of the 3 data items"):
        SkipMonitor.for_dataset(dataset, 0.5, report_path=tmp_path / "r.json", log=lines.append)
    assert len(lines) == 2 and "k1" in lines[0]
    assert json.loads((tmp_path / "r.json").read_text())["stopped"] is True
