"""The README's usage snippets run as written, on a tiny run of the embedded default."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


@pytest.mark.slow
def test_using_a_distilled_adapter_snippets_run(tmp_path, monkeypatch):
    from condistill.training.loop import distill
    from condistill.world.scenes import generate_scene
    from helpers import tiny_run_config

    monkeypatch.chdir(tmp_path)
    distill(tiny_run_config("embedded:tiny-teacher", "runs/edge", batch_size=2))
    distill(tiny_run_config("embedded:tiny-teacher", "runs/sr", batch_size=2, condition="sr"))
    generate_scene(0, "heldout").image.save("scene.png")
    blocks = _python_blocks("Using a distilled adapter")
    assert blocks, "the README lost its usage snippet"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    image = namespace["image"]
    assert image.size == (64, 64)
    assert tuple(namespace["control"].shape) == (1, 3, 64, 64)


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
