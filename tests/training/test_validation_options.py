"""``--validation-images``/``--validation-prompts`` and ``--report-to`` in a training run (tiny base, seconds)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from condistill.config import ConfigError, validation_pairs
from condistill.training.loop import distill
from helpers import tiny_run_config as _cfg

# tests/training/test_loop.py RECORDED_LOSSES["codi"]: validation must not move the training streams
RECORDED_CODI = [93.07316589355469, 3.410846471786499]


def _images(folder, count=2):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (48, 32), (20, 20, 20))
        image.paste((230, 200, 40), (8 + 4 * i, 6, 30, 26))  # a square: the edge condition has edges
        paths.append(str(folder / f"img{i}.png"))
        image.save(paths[-1])
    return paths


def test_pairing_rule():
    assert validation_pairs(["a", "b"], ["x", "y"]) == [("a", "x"), ("b", "y")]
    assert validation_pairs(["a", "b"], ["x"]) == [("a", "x"), ("b", "x")]
    assert validation_pairs(["a"], ["x", "y"]) == [("a", "x"), ("a", "y")]
    assert validation_pairs(["a", "b"], []) == [("a", ""), ("b", "")]
    assert validation_pairs([], []) == []
    with pytest.raises(ValueError, match="2 validation images and 3 prompts"):
        validation_pairs(["a", "b"], ["x", "y", "z"])


def test_validation_options_are_checked_before_anything_runs(tiny_base, tmp_path):
    good = _images(tmp_path / "img")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_base, tmp_path / "run", validation_images=[*good, str(tmp_path / "bad.png"), str(tmp_path / "no.png")],
             validation_prompts=["a", "b"])
    text = str(err.value)
    assert "4 validation images and 2 prompts" in text
    assert f"{str(tmp_path / 'bad.png')!r} cannot be read (corrupt" in text
    assert f"{str(tmp_path / 'no.png')!r} cannot be read (missing_file" in text
    with pytest.raises(ConfigError, match="validation_prompts without validation_images"):
        _cfg(tiny_base, tmp_path / "run", validation_prompts=["a red cube"])
    assert not (tmp_path / "run").exists()


def test_user_validation_images_become_grids_and_tensorboard_images(tiny_base, tmp_path):
    paths = _images(tmp_path / "img", 3)
    out = distill(_cfg(tiny_base, tmp_path / "run", validate_every=1, recommended_steps=3, validation_images=paths,
                       validation_prompts=["a red cube"]))
    assert [json.loads(l)["loss"] for l in (out / "loss.jsonl").read_text().splitlines()] == pytest.approx(
        RECORDED_CODI, rel=1e-3)
    grids = sorted((out / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-0000001.png", "step-0000002.png"]
    tile = 2 * 16  # the tiny base samples 16 px images, shown at scale 2
    # 3 columns (the images), rows: condition, real, 1, 2, 3 (recommended) and 4 steps
    assert Image.open(grids[-1]).size == (70 + 3 * tile, 6 * tile)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []  # logs/condistill/events.* (and the hparams' own sub-folder)
    for events_file in sorted((out / "logs").rglob("events.*")):
        events = EventAccumulator(str(events_file), size_guidance={"images": 0}).Reload()
        logged += [e for tag in events.Tags()["images"] if tag == "validation" for e in events.Images(tag)]
    assert [e.step for e in logged] == [1, 2] and (logged[-1].width, logged[-1].height) == (70 + 3 * tile, 6 * tile)


def test_report_to_none_writes_no_tracker_logs(tiny_base, tmp_path):
    out = distill(_cfg(tiny_base, tmp_path / "run", max_steps=1, report_to="none"))
    assert not list((out / "logs").rglob("events.*"))
    assert list((out / "validation").glob("step-*.png")) and (out / "loss.jsonl").is_file()
    default = distill(_cfg(tiny_base, tmp_path / "tb", max_steps=1))
    assert list((default / "logs").rglob("events.*"))


def test_one_step_validation_starts_where_distribution_matching_trains_it(tiny_base, tmp_path, monkeypatch):
    """With ``--dmd-start-timestep 499`` the grid's one-step row starts from the zero latent (edge) noised to t = 499,
    as the export's pipeline samples it; the other rows start from pure noise at the top of the grid."""
    import torch

    import condistill.method.sampler as sampler

    calls = []
    real = sampler.sample_images

    def recording(base, fn, captions, steps, **kwargs):
        calls.append((steps, kwargs.get("start_timestep"), kwargs.get("init_latents")))
        return real(base, fn, captions, steps, **kwargs)

    monkeypatch.setattr(sampler, "sample_images", recording)
    distill(_cfg(tiny_base, tmp_path / "run", loss="codi+dmd", dmd_start_timestep=499, max_steps=1, validate_every=1))
    assert calls and {steps for steps, _, _ in calls} == {1, 2, 4}
    for steps, start, init in calls:
        assert (start, init is None) == ((499, False) if steps == 1 else (None, True))
        assert init is None or (init.abs().sum() == 0 and init.dtype == torch.float32)  # the zero latent
