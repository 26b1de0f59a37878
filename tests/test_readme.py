"""The README's usage snippets run as written, on a tiny run of the embedded default."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: the README sections whose python blocks run here, in order, in one namespace (tests/test_docs.py
#: counts them as run and runs every other documented block itself)
SECTIONS = ("Using a distilled adapter",)
#: the ``sd15-gpu`` edge preset's Canny thresholds, not the defaults (50/100)
TRAINED_EDGE = {"low_threshold": 100, "high_threshold": 200}


def section_of(text: str, position: int) -> str:
    """The ``## `` section of README text that ``position`` lies in ("" before the first one)."""
    heads = [m for m in re.finditer(r"^## (.+)$", text, flags=re.M) if m.start() <= position]
    return heads[-1].group(1).strip() if heads else ""


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
            if section_of(text, m.start()) == section]


@pytest.mark.slow
def test_using_a_distilled_adapter_snippets_run_with_the_trained_condition(tmp_path, monkeypatch):
    """The section's blocks run as written on runs trained with non-default edge thresholds, and the
    control image is the trained condition at the trained resolution: exactly what the thresholds the run
    recorded give on the photo fitted to 64 px as training fits its images, not the defaults' result."""
    import torch

    from condistill import get_condition
    from condistill.data.images import fit_record
    from condistill.data.record import Record
    from condistill.training.loop import distill
    from condistill.world.scenes import generate_scene
    from helpers import tiny_run_config

    monkeypatch.chdir(tmp_path)
    distill(tiny_run_config("embedded:tiny-teacher", "runs/edge", batch_size=2, condition_options=TRAINED_EDGE))
    distill(tiny_run_config("embedded:tiny-teacher", "runs/sr", batch_size=2, condition="sr", loss="codi+dmd",
                            dmd_start_timestep=499))
    # a photo that is neither the training size nor square: control_image must fit it first
    generate_scene(0, "heldout", resolution=96).image.crop((0, 0, 96, 80)).save("scene.png")
    blocks = [block for section in SECTIONS for block in _python_blocks(section)]
    assert blocks, "the README lost its usage snippet"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["image"].size == (64, 64)

    control = namespace["control"]
    photo = namespace["photo"]
    fitted = fit_record(Record(image=photo), 64)[0].image
    assert fitted.size == (64, 64) and photo.size == (96, 80)
    assert torch.equal(control, get_condition("edge", **TRAINED_EDGE).control_image(fitted))
    assert not torch.equal(control, get_condition("edge").control_image(fitted))  # the defaults, 50/100


def test_control_image_crops_to_a_multiple_and_refuses_tiny_images():
    import numpy as np
    import torch
    from PIL import Image

    from condistill import get_condition

    edge = get_condition("edge")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (75, 100, 3), dtype=np.uint8))
    control = edge.control_image(photo)
    assert tuple(control.shape) == (1, 3, 72, 96)
    assert torch.equal(control[0], edge.prepare(photo)[:, 1:73, 2:98])  # cropped, never stretched
    assert tuple(edge.control_image(Image.new("RGB", (100, 75)), multiple=4).shape) == (1, 3, 72, 100)
    with pytest.raises(ValueError, match="1x1 pixels; both sides must be at least 16"):
        edge.control_image(Image.new("RGB", (1, 1)))
