"""Small PNG writers (loss curve, image grids) with PIL only."""
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


def plot_loss_curve(log_path: Path, out_path: Path, key: str = "loss", size=(640, 360)) -> Path | None:
    """Line plot of ``key`` against ``step`` from a ``loss.jsonl`` log (log-scaled y)."""
    if not Path(log_path).exists():
        return None
    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    pts = [(r["step"], r[key]) for r in recs if key in r and r[key] > 0]
    if not pts:
        return None
    W, H = size
    m = 50
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    xs = np.array([p[0] for p in pts], float)
    ys = np.log10(np.array([p[1] for p in pts], float))
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
    y0, y1 = ys.min(), max(ys.max(), ys.min() + 1e-6)
    px = m + (xs - x0) / (x1 - x0) * (W - 2 * m)
    py = H - m - (ys - y0) / (y1 - y0) * (H - 2 * m)
    d.rectangle([m, m, W - m, H - m], outline=(0, 0, 0))
    if len(pts) > 1:
        d.line(list(zip(px.tolist(), py.tolist())), fill=(30, 90, 200), width=2)
    else:
        d.ellipse([px[0] - 2, py[0] - 2, px[0] + 2, py[0] + 2], fill=(30, 90, 200))
    d.text((m, 10), f"{key} (log scale) vs step", fill=(0, 0, 0))
    d.text((m, H - m + 8), f"{int(x0)}", fill=(0, 0, 0))
    d.text((W - m - 30, H - m + 8), f"{int(x1)}", fill=(0, 0, 0))
    d.text((4, m), f"{10 ** y1:.3g}", fill=(0, 0, 0))
    d.text((4, H - m - 10), f"{10 ** y0:.3g}", fill=(0, 0, 0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path)
    return out_path
