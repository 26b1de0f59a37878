"""Small PNG writers: the training curves (matplotlib) and image grids (PIL)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(t: torch.Tensor) -> Image.Image:
    """``[C, H, W]`` in ``[0, 1]`` -> PIL RGB (1 channel is shown as gray, 4 as its first 3)."""
    t = t.detach().float().cpu().clamp(0, 1)
    if t.shape[0] == 1:
        t = t.repeat(3, 1, 1)
    arr = (t[:3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None = None, scale: int = 2) -> Image.Image:
    """Rows of equally sized images, each row optionally labelled at its left."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    pad = 70 if labels else 0
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (pad + cols * w, len(rows) * h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        if labels:
            draw.text((4, r * h + h // 2 - 6), labels[r], fill=(0, 0, 0))
        for c, im in enumerate(row):
            canvas.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (pad + c * w, r * h))
    return canvas


def save_validation_grid(path: Path, batch: dict, samples: Sequence[torch.Tensor], names: Sequence[str]) -> Path:
    """Rows: the condition, the real image, then each sample set (``[B, 3, H, W]`` in [0, 1])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [[to_pil(c) for c in batch["conditioning"]],
            [to_pil((p + 1) / 2) for p in batch["pixel_values"]]]
    rows += [[to_pil(x) for x in s] for s in samples]
    grid(rows, ["condition", "real", *names]).save(path)
    return path


#: the terms a run logs beside its total loss, in the order they are drawn, with their legend names
LOSS_TERMS = {"loss": "total", "distill": "consistency", "regression": "regression", "dmd": "distribution matching",
              "fake_score": "fake score (its own loss)", "gan_g": "GAN (student)", "gan_d": "GAN (discriminator)"}


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first points are not pulled
    toward zero, and a constant series stays constant."""
    out, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * float(value)
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return np.asarray(out)


def plot_loss_curve(log_path: Path, out_path: Path, validation_steps: Sequence[int] = (),
                    smoothing: float = 0.9) -> Path | None:
    """The run's curves from ``loss.jsonl`` into a PNG: every logged loss term raw (faint) and smoothed
    (:func:`smooth`), on a log scale when all are positive, the learning rate below on the same steps, and the
    validation steps marked on both. Returns None (writing nothing) for a missing or empty log.

    The consistency loss is noisy by nature (a random grid point and noise per sample): read the smoothed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if not Path(log_path).exists():
        return None
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r and "loss" in r]
    if not records:
        return None
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    losses, rates = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    positive = True
    for index, (key, label) in enumerate(LOSS_TERMS.items()):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
        if not points:
            continue
        steps, values = np.asarray(points, dtype=float).T
        positive = positive and bool((values > 0).all())
        color = f"C{index}"
        losses.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        losses.plot(steps, smooth(values, smoothing), color=color, linewidth=1.8, label=f"{label} (smoothed)")
    if positive:
        losses.set_yscale("log")
    losses.set_ylabel("loss (mean over the batch)")
    losses.set_title(f"training curves: faint = logged values, bold = smoothed (EMA {smoothing:g})")
    lr = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), (int, float))]
    if lr:
        rates.plot(*np.asarray(lr, dtype=float).T, color="black", linewidth=1.2)
    rates.set_ylabel("learning rate")
    rates.set_xlabel("optimizer step")
    rates.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for i, step in enumerate(sorted(set(validation_steps))):
        for axis in (losses, rates):
            axis.axvline(step, color="grey", linestyle=":", linewidth=0.8,
                         label="validation" if axis is losses and i == 0 else None)
    losses.legend(fontsize="small", loc="best", framealpha=0.8)
    for axis in (losses, rates):
        axis.grid(True, alpha=0.3)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return Path(out_path)
