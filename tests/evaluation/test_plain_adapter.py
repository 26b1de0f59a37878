"""condistill eval --baseline takes a plain diffusers ControlNet folder (no condistill export): the adapter a
user already has, started from its folder and sampled like a baseline."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tiny_base, perturb_

from condistill.adapters import build_student
from condistill.adapters.save_load import save_adapter
from condistill.cli import main
from condistill.conditions import get_condition
from condistill.evaluation.plain_adapter import load_plain_adapter, plain_adapter_kind
from condistill.frozen import load_base


@pytest.fixture(scope="module")
def student_and_plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    base = load_base(str(make_tiny_base(root)))
    student = build_student("controlnet", base, 3)
    perturb_(student, seed=4)
    save_adapter(student, root / "run" / "adapter", base_name_or_path=str(base.name_or_path),
                 base_fingerprint=base.fingerprint(), num_grid=50, prediction_type=base.prediction_type,
                 resolution=base.resolution, noise_schedule=base.noise_schedule_config(), condition_name="edge",
                 condition_config=get_condition("edge").config(), recommended_steps=4)
    perturb_(student, seed=5)
    student.controlnet.save_pretrained(root / "plain")
    return base, root / "run", root / "plain", {k: v.clone() for k, v in student.controlnet.state_dict().items()}


def test_a_diffusers_folder_is_told_from_an_export_and_loads_its_weights(student_and_plain, tmp_path):
    base, run, plain, state = student_and_plain
    assert plain_adapter_kind(str(plain)) == ("controlnet", "pretrained_controlnet")
    assert plain_adapter_kind(str(run)) is None and plain_adapter_kind(str(run / "adapter")) is None
    assert plain_adapter_kind(str(tmp_path)) is None
    loaded = load_plain_adapter(str(plain), base, get_condition("edge"))
    assert all(torch.equal(loaded.controlnet.state_dict()[k], state[k]) for k in state)


@pytest.mark.slow
def test_eval_scores_a_plain_controlnet_as_the_baseline(student_and_plain, tmp_path):
    _, run, plain, _ = student_and_plain
    out = tmp_path / "out"
    assert main(["eval", "--condition", "edge", "--student", str(run), "--baseline", str(plain),
                 "--num-images", "2", "--batch-size", "2", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["baseline-ddim-50"]["model"] == str(plain) and "edge_f1" in rows["baseline-ddim-50"]["metrics"]
    assert report["models"][str(plain)]["kind"].startswith("controlnet (a diffusers folder")


def test_a_missing_column_and_an_unreachable_hub_baseline_are_one_line_errors(student_and_plain, tmp_path, capsys,
                                                                              monkeypatch):
    import datasets

    from PIL import Image

    _, run, _, _ = student_and_plain
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (32, 32))], "text": ["a"]},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                               ).save_to_disk(tmp_path / "data")
    assert main(["eval", "--condition", "edge", "--student", str(run), "--data", str(tmp_path / "data"),
                 "--data-options", '{"caption_column": "prompt"}', "--num-images", "1"]) == 1
    err = capsys.readouterr().err
    assert "has no column 'prompt'" in err and "internal error" not in err
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--condition", "edge", "--student", str(run), "--baseline", "someone/not-cached",
                 "--num-images", "1"]) == 1
    err = capsys.readouterr().err
    assert "someone/not-cached" in err and "offline" in err.lower() and "internal error" not in err
