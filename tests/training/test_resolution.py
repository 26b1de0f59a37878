"""Runs at a resolution other than the base's native one, and the settings refused at start.

The embedded teacher (native 64 px) trains at half and double its size through the command
line; each run resumes, exports, and its ``load_adapter`` pipeline and ``condistill eval`` sample
at the run's resolution by default. (Tiny SD and SDXL bases at non-native sizes, in bf16, are in
``test_mixed_precision.py``.)
"""
from __future__ import annotations

import json

import pytest
import torch

from condistill.cli import main
from helpers import torch_single_thread  # noqa: F401


def _train(out, *extra) -> int:
    return main(["train", "edge", "--output-dir", str(out), "--batch-size", "2", "--data", "synthetic:train:8",
                 "--checkpoint-every", "1", "--validate-every", "0", "--report-to", "none", *extra])


@pytest.mark.parametrize("size", [32, 128])
def test_embedded_teacher_at_another_resolution(tmp_path, size, capsys):
    from condistill import load_adapter
    from condistill.world.scenes import generate_scene

    out = tmp_path / f"edge-{size}"
    assert _train(out, "--max-steps", "1", "--resolution", str(size)) == 0
    assert _train(out, "--max-steps", "2", "--resolution", str(size), "--resume", "latest") == 0
    config = json.loads((out / "adapter" / "condistill_config.json").read_text())
    assert (config["resolution"], config["height"], config["width"]) == (size, size, size)
    assert config["extra"]["steps_trained"] == 2
    from PIL import Image
    assert Image.open(out / "validation" / "step-0000002.png").height > size  # the grid of size-px samples

    pipe = load_adapter(out)
    assert (pipe.condistill_defaults["height"], pipe.condistill_defaults["width"]) == (size, size)
    photo = generate_scene(0, "heldout", resolution=96).image  # neither the native nor the run's size
    control = pipe.condistill_condition.control_image(photo)
    assert tuple(control.shape) == (1, 3, size, size)
    image = pipe("a red circle", image=control, generator=torch.Generator().manual_seed(0),
                 **pipe.condistill_defaults).images[0]
    assert image.size == (size, size)

    assert main(["eval", "--condition", "edge", "--row", f"student-4={out}:codi-stochastic:4",
                 "--row", "teacher-2=teacher:ddim:2", "--num-images", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["resolution"] == size  # the student's and the teacher's rows, at the run's size


def _refused_before_the_base_loads(tmp_path, capsys, monkeypatch, *options) -> list[str]:
    """The stderr lines of a training command that must stop (status 1) before the base loads or a folder appears."""
    import condistill.training.loop as loop

    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    assert _train(tmp_path / "run", "--max-steps", "1", "--lr-warmup-steps", "0", *options) == 1
    assert not (tmp_path / "run").exists()
    return capsys.readouterr().err.strip().splitlines()


def test_an_unusable_resolution_is_refused_in_one_line_before_the_base_loads(tmp_path, capsys, monkeypatch):
    err = _refused_before_the_base_loads(tmp_path, capsys, monkeypatch, "--resolution", "40")
    assert err == ["condistill train edge: error: --resolution 40: this base (embedded:tiny-teacher, native 64 px) "
                   "trains at multiples of 16 px; the nearest usable are 32 and 48"]
    err = _refused_before_the_base_loads(tmp_path, capsys, monkeypatch, "--resolution", "8")
    assert "the nearest usable are 16" in err[0]


def test_fp16_off_cuda_is_refused_in_one_line_naming_bf16(tmp_path, capsys, monkeypatch):
    err = _refused_before_the_base_loads(tmp_path, capsys, monkeypatch, "--mixed-precision", "fp16")
    assert err == ["condistill train edge: error: --mixed-precision fp16 needs a CUDA GPU and this run is on cpu; "
                   "use --mixed-precision bf16 (or no)"]


def test_an_export_written_before_the_schema_version_still_loads(tmp_path):
    """Its missing keys are derived: height and width from the training resolution."""
    from condistill import load_adapter
    from condistill.training.loop import distill
    from helpers import tiny_run_config

    out = tmp_path / "old"
    distill(tiny_run_config("embedded:tiny-teacher", out, max_steps=1, batch_size=2, resolution=32,
                            data="synthetic:train:4", report_to="none"))
    config = json.loads((out / "adapter" / "condistill_config.json").read_text())
    for key in ("schema_version", "height", "width", "one_step_start"):
        del config[key]
    (out / "adapter" / "condistill_config.json").write_text(json.dumps(config))
    pipe = load_adapter(out)
    assert pipe.condistill_config["schema_version"] == 1
    assert (pipe.condistill_defaults["height"], pipe.condistill_defaults["width"]) == (32, 32)
    assert pipe.condistill_condition.training_resolution == 32


@pytest.mark.parametrize("family,blocks,sample,multiple", [("sd15", [320, 640, 1280, 1280], 64, 64),
                                                            ("sdxl", [320, 640, 1280], 128, 32)])
def test_usable_resolutions_of_full_size_bases(tmp_path, family, blocks, sample, multiple):
    """Read from the configs alone (the published SD 1.5 and SDXL shapes), no weights."""
    from condistill.config import SettingError, check_resolution

    root = tmp_path / family
    for sub, config in (("unet", {"block_out_channels": blocks, "sample_size": sample}),
                        ("vae", {"block_out_channels": [128, 256, 512, 512]})):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(config))
    native = sample * 8
    assert check_resolution(str(root), 0) == native
    assert check_resolution(str(root), 256) == 256  # the cheap first run
    assert check_resolution(str(root), native + multiple) == native + multiple
    with pytest.raises(SettingError, match=f"multiples of {multiple} px; the nearest usable are "
                                           f"{native} and {native + multiple}$"):
        check_resolution(str(root), native + 8)
