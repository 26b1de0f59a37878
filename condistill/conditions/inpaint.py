"""Inpainting condition: the image with a hole cut out, plus the hole mask.

Channel layout (``float32 [4, H, W]`` in ``[0, 1]``): channels 0-2 are the RGB image
with hole pixels set to 0, channel 3 is the mask, 1 inside the hole (the region to be
generated) and 0 where the image is kept.

Holes are unions of random rectangles and free-form brush strokes whose total area
is drawn uniformly from ``[min_coverage, max_coverage]`` of the image and always lands
inside that range.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from condistill.presets import CPU, SD15_GPU, SDXL_GPU, GUIDED
from condistill.conditions.condition import (
    check_seed,
    Condition,
    check_probability,
    register_condition,
    uint8_to_tensor,
)
from condistill.data.record import Record
from condistill.seeding import numpy_rng

__all__ = ["InpaintCondition"]

_SALT = 0x494E  # "IN"
_MAX_SHAPES = 40


def _rectangle(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    h = max(1, int(round(height * rng.uniform(0.1, 0.6))))
    w = max(1, int(round(width * rng.uniform(0.1, 0.6))))
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    shape = np.zeros((height, width), dtype=bool)
    shape[top:top + h, left:left + w] = True
    return shape


def _stroke(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A brush stroke: a random walk of 2-6 thick segments with round joints."""
    short = min(height, width)
    brush = max(1, int(round(short * rng.uniform(0.05, 0.15))))
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    angle = rng.uniform(0, 2 * math.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(2, 7))):
        angle += rng.uniform(-0.6 * math.pi, 0.6 * math.pi)
        length = short * rng.uniform(0.1, 0.4)
        x = float(np.clip(x + length * math.cos(angle), 0, width - 1))
        y = float(np.clip(y + length * math.sin(angle), 0, height - 1))
        points.append((x, y))
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    draw.line(points, fill=255, width=brush, joint="curve")
    r = brush / 2
    for px, py in points:
        draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return np.asarray(canvas) > 0


def _dilate(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary dilation."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _grow_to(mask: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Grow ``mask`` ring by ring (random pixels of the last ring) to exactly ``target`` pixels."""
    mask = mask.copy()
    if not mask.any():
        mask[int(rng.integers(mask.shape[0])), int(rng.integers(mask.shape[1]))] = True
    count = int(mask.sum())
    while count < target:
        ring = _dilate(mask) & ~mask
        ring_idx = np.flatnonzero(ring)
        need = target - count
        if len(ring_idx) > need:
            ring_idx = rng.choice(ring_idx, size=need, replace=False)
        mask.flat[ring_idx] = True
        count += len(ring_idx)
    return mask


class InpaintCondition(Condition):
    """Masked image + hole mask, ``float32 [4, H, W]`` in ``[0, 1]`` (mask: 1 = hole).

    Options:
        min_coverage, max_coverage: the hole covers between these fractions of the
            image area (default 0.1 and 0.5); the target is drawn uniformly per seed
            and the result always lies in the range (rounded to whole pixels).
        rectangle_probability: chance that each shape is a rectangle rather than a
            brush stroke (default 0.5; 1.0 = rectangles only, 0.0 = strokes only).
    """

    name = "inpaint"
    channels = 4
    #: the recipe of ``condistill train inpaint`` (:mod:`condistill.presets`)
    description = "inpainting: the condition is the masked image plus the mask (rectangles and brush strokes)."
    presets = {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (1000 steps, about 1 s each on one core; "
                               "see docs/results.md)", output_dir="runs/inpaint", max_steps=1000, validate_every=100,
                         **CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU", output_dir="runs/inpaint-sd15", **SD15_GPU, **GUIDED),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16)", output_dir="runs/inpaint-sdxl",
                         **SDXL_GPU, **GUIDED),
    }
    fidelity = ("masked_psnr", "higher")

    @classmethod
    def teacher_bar(cls, s, t):
        return f"hole PSNR >= teacher + 3 ({t['masked_psnr'] + 3:.2f})", s["masked_psnr"] >= t["masked_psnr"] + 3

    def fidelity_scores(self, images, data, judge):
        """PSNR against the real images inside the hole (the mask, the condition's fourth channel)."""
        from condistill.evaluation.metrics import psnr

        real = (data["pixel_values"] + 1) / 2
        hole = data["conditioning"][:, 3:4] > 0.5
        return {"masked_psnr": float(psnr(images, real, mask=hole.expand_as(images)))}

    def __init__(self, *, min_coverage: float = 0.1, max_coverage: float = 0.5,
                 rectangle_probability: float = 0.5):
        for key, value in (("min_coverage", min_coverage), ("max_coverage", max_coverage)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
                raise ValueError(f"{key} must be a fraction of the image area in (0, 1], got {value!r}")
        if min_coverage > max_coverage:
            raise ValueError(
                f"min_coverage ({min_coverage}) must not exceed max_coverage ({max_coverage}); swap them"
            )
        self.min_coverage = float(min_coverage)
        self.max_coverage = float(max_coverage)
        self.rectangle_probability = check_probability("rectangle_probability", rectangle_probability)

    def make_mask(self, height: int, width: int, seed: int = 0) -> np.ndarray:
        """Hole mask ``bool [height, width]`` (``True`` = hole) for ``seed``.

        Shapes are added while they keep the hole under ``max_coverage``, until the
        drawn target area is reached; a hole still short of it is grown at its border
        to exactly the target.

        Raises:
            ValueError: non-positive size, or an image so small that no whole number of
                pixels falls inside the coverage range.
        """
        for key, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        height, width = int(height), int(width)
        total = height * width
        n_min = max(1, math.ceil(self.min_coverage * total - 1e-9))
        n_max = math.floor(self.max_coverage * total + 1e-9)
        if n_min > n_max:
            raise ValueError(
                f"a {height}x{width} image has no whole number of pixels covering "
                f"[{self.min_coverage}, {self.max_coverage}] of its area; widen the coverage range"
            )
        rng = numpy_rng(check_seed(seed), _SALT)
        target = int(rng.integers(n_min, n_max + 1))
        mask = np.zeros((height, width), dtype=bool)
        count = 0
        for _ in range(_MAX_SHAPES):
            if count >= target:
                break
            if rng.random() < self.rectangle_probability:
                shape = _rectangle(rng, height, width)
            else:
                shape = _stroke(rng, height, width)
            grown = mask | shape
            grown_count = int(grown.sum())
            if grown_count <= n_max:
                mask, count = grown, grown_count
        if count < target:
            mask = _grow_to(mask, target, rng)
        return mask

    def compute(self, record: Record, seed: int) -> torch.Tensor:
        """Cut a ``make_mask(H, W, seed)`` hole out of ``record.image``."""
        width, height = record.image.size
        mask = torch.from_numpy(self.make_mask(height, width, seed)).to(torch.float32)
        image = uint8_to_tensor(np.asarray(record.image, dtype=np.uint8))
        return torch.cat([image * (1.0 - mask), mask.unsqueeze(0)], dim=0)

    def start_image(self, cond: torch.Tensor) -> torch.Tensor:
        """The known pixels, with the hole filled by their mean colour (per image), in ``[-1, 1]``.

        A hole left black would bias the noised start toward a black fill; the mean colour
        biases it least. An image with no known pixel starts from mid-grey.
        """
        cond = self._check_batch(cond)
        image, hole = cond[:, :3], (cond[:, 3:4] > 0.5).float()
        known = 1.0 - hole
        count = known.sum(dim=(2, 3), keepdim=True)
        mean = torch.where(count > 0, (image * known).sum(dim=(2, 3), keepdim=True) / count.clamp(min=1.0),
                           torch.full_like(count, 0.5))
        return (image * known + mean * hole) * 2.0 - 1.0

    def to_pil(self, cond: torch.Tensor) -> Image.Image:
        """The masked image with the hole drawn as a grey checkerboard (RGB)."""
        cond = self._check_tensor(cond)
        image, hole = cond[:3], cond[3] > 0.5
        _, height, width = cond.shape
        tile = max(2, min(height, width) // 16)
        yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        checker = torch.where(((yy // tile + xx // tile) % 2) == 0, 0.45, 0.7)
        shown = torch.where(hole.unsqueeze(0), checker.unsqueeze(0).expand(3, -1, -1), image)
        array = shown.mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(np.ascontiguousarray(array), "RGB")


register_condition(InpaintCondition)
