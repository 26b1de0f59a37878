"""The training-curve plot and its smoothing."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from condistill.plots import plot_loss_curve, smooth


def test_smoothing_is_an_unbiased_moving_average():
    assert np.allclose(smooth([2.0] * 10), 2.0)  # a constant stays itself: no pull toward zero at the start
    assert smooth([1.0, 3.0], 0.5)[1] == (0.5 * 0.5 * 1 + 0.5 * 3) / (0.5 * 0.5 + 0.5)
    noisy = 1.0 + np.random.default_rng(0).normal(0, 0.5, 2000)
    assert np.std(smooth(noisy)[500:]) < np.std(noisy) / 3  # it does smooth


def test_every_term_the_learning_rate_and_the_validation_steps_are_drawn(tmp_path):
    log = tmp_path / "loss.jsonl"
    rng = np.random.default_rng(1)
    with log.open("w") as f:
        for step in range(1, 201):
            record = {"step": step, "loss": 1 + rng.random(), "lr": 1e-4 * min(1, step / 50), "distill": rng.random(),
                      "regression": 0.5, "dmd": rng.random(), "fake_score": 0.1 + rng.random()}
            f.write(json.dumps(record) + "\n")
    out = plot_loss_curve(log, tmp_path / "plots" / "loss.png", validation_steps=[50, 100, 150])
    assert out == tmp_path / "plots" / "loss.png"
    image = Image.open(out)
    assert image.size == (800, 600)
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    negative = tmp_path / "negative.jsonl"  # a loss that can be negative is drawn on a linear scale, not refused
    negative.write_text("\n".join(json.dumps({"step": s, "loss": -1.0 + s, "lr": 1e-4}) for s in range(3)))
    assert plot_loss_curve(negative, tmp_path / "negative.png").is_file()


def test_a_missing_or_empty_log_draws_nothing(tmp_path):
    assert plot_loss_curve(tmp_path / "none.jsonl", tmp_path / "a.png") is None
    (tmp_path / "empty.jsonl").write_text("\n")
    assert plot_loss_curve(tmp_path / "empty.jsonl", tmp_path / "b.png") is None
    assert not list(tmp_path.glob("*.png"))
