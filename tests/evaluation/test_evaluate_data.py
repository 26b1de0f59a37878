"""``condistill eval --data``: the user's own images (a folder written here), 2-step tiny students, no judge."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condistill.adapters.save_load import read_adapter_config
from condistill.cli import main
from condistill.data.sources import open_source
from condistill.evaluation import backends
from condistill.evaluation.evaluate import RowSpec, markdown_table
from condistill.evaluation.evaluate import evaluate_data
from condistill.evaluation.user_data import DEPTH_RECORD_SKIP, fidelity, read_prompts
from condistill.training.loop import distill
from helpers import make_tiny_base, tiny_run_config


@pytest.fixture(autouse=True)
def one_timing_pass(monkeypatch):
    import condistill.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "TIMING_SECONDS", 0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six synthetic scene images saved as PNG with sidecar .txt captions."""
    root = tmp_path_factory.mktemp("userdata") / "images"
    root.mkdir()
    for i, record in enumerate(open_source("synthetic:heldout:6", resolution=64)):
        record.image.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(record.caption)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    base = str(make_tiny_base(root))
    return {"edge": distill(tiny_run_config(base, root / "edge")),
            "sr": distill(tiny_run_config(base, root / "sr", condition="sr"))}


@pytest.fixture
def no_optional(monkeypatch, tmp_path):
    """No optional backend: an empty torch hub folder and no injected networks."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CONDISTILL_CLIP_MODEL", raising=False)
    for metric in backends.METRICS:
        monkeypatch.setitem(backends.BACKENDS, metric, None)
        backends.BACKENDS.pop(metric)


def _rows(run):
    return [RowSpec("student-1", str(run), "codi", 1), RowSpec("student-2", str(run), "codi", 2),
            RowSpec("teacher-ddim-2", "teacher", "ddim", 2, 3.0)]


def test_every_row_scored_on_the_same_items_with_reasons_for_skips(runs, folder, tmp_path, no_optional):
    logs = []
    report = evaluate_data("edge", _rows(runs["edge"]), str(folder), num_images=4, batch_size=2,
                           out_dir=tmp_path / "a", log=logs.append)
    assert [r["name"] for r in report["rows"]] == ["student-1", "student-2", "teacher-ddim-2"]
    for r in report["rows"]:
        m = r["metrics"]
        assert {"edge_f1", "seconds_per_image"} <= m.keys()
        assert all(math.isfinite(v) for v in m.values()) and 0 <= m["edge_f1"] <= 1
        assert "prompt_accuracy" not in m and "frechet_distance" not in m  # no judge
    assert report["num_images"] == 4 and report["data"] == str(folder)
    captions = {p.stem: p.read_text() for p in folder.glob("*.txt")}
    assert all(item["prompt"] == captions[item["key"].split(".")[0]] for item in report["items"])
    skipped = report["skipped_metrics"]
    assert {"fid_inception", "clip_score"} <= skipped.keys()
    assert all("skipped" in why for why in skipped.values()) and "pytorch_fid" in skipped["fid_inception"]
    assert any("FID" in line for line in logs) and any("CLIP" in line for line in logs)
    out = tmp_path / "a"
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    md = (out / "results.md").read_text()
    assert f"`{folder}`" in md and "| student-2 |" in md and "Skipped metrics:" in md
    assert (out / "samples.png").stat().st_size > 0
    # a second eval draws the same items, conditions, prompts and seeds: identical numbers but latency
    again = evaluate_data("edge", _rows(runs["edge"]), str(folder), num_images=4, batch_size=2, out_dir=tmp_path / "b")
    assert again["items"] == report["items"] and again["sampling_seeds"] == report["sampling_seeds"]
    assert torch.equal(load_file(str(out / "conditions.safetensors"))["conditioning"],
                       load_file(str(tmp_path / "b" / "conditions.safetensors"))["conditioning"])
    for a, b in zip(report["rows"], again["rows"]):
        a, b = dict(a["metrics"]), dict(b["metrics"])
        a.pop("seconds_per_image"), b.pop("seconds_per_image")
        assert a == pytest.approx(b)
    other = evaluate_data("edge", _rows(runs["edge"])[:1], str(folder), num_images=4, batch_size=2, seed=1)
    assert [i["index"] for i in other["items"]] != [i["index"] for i in report["items"]]


def test_standin_networks_give_fid_and_lpips(runs, folder, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "fid_inception",
                        lambda device: (lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)))
    monkeypatch.setitem(backends.BACKENDS, "lpips", lambda device: (lambda a, b: (a - b).abs().mean((1, 2, 3))))
    monkeypatch.setitem(backends.BACKENDS, "clip_score", lambda device: (lambda x, prompts: x.mean((1, 2, 3)) * 100))
    rows = [RowSpec("student-1", str(runs["sr"]), "codi", 1), RowSpec("bicubic", "bicubic", "none", 0, 0.0)]
    report = evaluate_data("sr", rows, str(folder), num_images=4, batch_size=2, log=lambda msg: None)
    for r in report["rows"]:
        m = r["metrics"]
        assert {"psnr", "ssim", "lpips", "fid_inception", "clip_score", "seconds_per_image"} <= m.keys()
        assert all(math.isfinite(v) for v in m.values())
    assert not report["skipped_metrics"]
    table = markdown_table(report)
    assert "lpips (lower)" in table and "clip_score (higher)" in table and "fid_inception (lower)" in table and "| bicubic |" in table


def test_prompts_override_captions(runs, folder, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\n\na blue ball\n")
    assert read_prompts(str(path)) == ["a red cube", "a blue ball"] and read_prompts("a sky") == ["a sky"]
    report = evaluate_data("edge", _rows(runs["edge"])[:1], str(folder), num_images=3, batch_size=3,
                           prompts=str(path))
    assert [i["prompt"] for i in report["items"]] == ["a red cube", "a blue ball", "a red cube"]


def test_depth_from_records_is_skipped_with_the_reason():
    from condistill.conditions.depth import DepthCondition

    skipped = {}
    data = {"pixel_values": torch.zeros(1, 3, 8, 8), "conditioning": torch.zeros(1, 3, 8, 8)}
    assert fidelity("depth", DepthCondition(source="record"), torch.zeros(1, 3, 8, 8), data, skipped) == {}
    assert DEPTH_RECORD_SKIP in skipped["depth_error"] and "source=estimator" in skipped["depth_error"]


def test_depth_through_the_conditions_estimator(monkeypatch):
    import numpy as np

    from condistill.conditions.depth import DepthCondition

    cond = DepthCondition(source="estimator")
    monkeypatch.setattr(cond, "estimate", lambda image: np.asarray(image, dtype=np.float32)[..., 0] / 255.0)
    images = torch.rand(2, 3, 8, 8)
    data = {"pixel_values": images * 2 - 1, "conditioning": images[:, :1].expand(-1, 3, -1, -1) * 0.5 + 0.2}
    skipped = {}
    assert fidelity("depth", cond, images, data, skipped)["depth_error"] < 0.01 and not skipped
    monkeypatch.setattr(cond, "estimate", lambda image: (_ for _ in ()).throw(OSError("no weights here")))
    assert fidelity("depth", cond, images, data, skipped) == {}
    assert skipped["depth_error"] == ("depth_error skipped: the depth condition could not measure it (OSError: no "
                                      "weights here)")


def test_cli_eval_data_records_the_card(runs, folder, tmp_path, capsys, no_optional):
    run = runs["edge"]
    code = main(["eval", "--condition", "edge", "--student", str(run), "--data", str(folder), "--num-images", "2",
                 "--batch-size", "2", "--out", str(tmp_path / "o")])
    assert code == 0
    printed = capsys.readouterr()
    assert "| student-4 |" in printed.out and "| teacher-ddim-50 |" in printed.out
    print(printed.out)
    card = (Path(read_adapter_config(run)["_folder"]) / "README.md").read_text()  # the run's adapter/
    assert f"--data {folder}" in card and f"Data: `{folder}`" in card and "| student-1 |" in card
    assert "|\n\nSkipped metrics:" in card  # a blank line keeps the note out of the markdown table above it
    assert main(["eval", "--condition", "edge", "--student", str(run), "--data", str(tmp_path / "nothing")]) == 1
    assert "--data" in capsys.readouterr().err

