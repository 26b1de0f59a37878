"""What the demo page hands a student: its condition, made from a sketch, an upload or a brushed mask.

Everything here is plain numpy / PIL / torch (no Gradio), so the page's conversions are tested on
their own and the Python API can make the same condition a page made.

* :func:`sketch_to_edges`: a drawn canvas *is* the edge map. Strokes are told from the background,
  the canvas is reduced to the run's resolution by area and the covered pixels kept, so a stroke
  drawn with the page's brush (``canvas / resolution`` canvas pixels wide) becomes a line about one
  training pixel wide, as Canny's are. It is never passed through Canny, which would draw both
  sides of every stroke.
* :func:`read_upload`: an uploaded file, opened with bounds on its size and dimensions; a file that
  is not an image is a :class:`BadInput` whose message the page shows.
* :func:`condition_from_upload`: the condition of an uploaded image as training made it
  (``pipe.condistill_condition.control_image``: edges by Canny with the run's thresholds, depth by
  the estimator or from a depth map, sr from the low-resolution image brought up to the run's size).
* :func:`inpaint_condition`: an image and a brushed mask (1 = hole) as the inpaint condition.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

#: The largest upload accepted, in bytes (the page refuses bigger files before reading them).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: The most pixels an uploaded image may have (width x height), checked before it is decoded.
MAX_UPLOAD_PIXELS = 4096 * 4096
#: The fraction of a training pixel a stroke must cover to be kept in the edge map (half: a stroke as wide as a pixel is never lost).
STROKE_COVERAGE = 0.5


class BadInput(ValueError):
    """An input the page cannot use; its message is shown in the page as it is."""


@dataclass(frozen=True)
class Canvas:
    """The drawing canvas of an edge student: ``size`` canvas pixels a side, ``brush`` pixels wide,
    which is one training pixel at the run's ``resolution``."""

    size: int
    brush: int


def canvas_for(resolution: int, least: int = 512) -> Canvas:
    """A square canvas at least ``least`` pixels a side whose side is a whole multiple of ``resolution``,
    with a brush one training pixel wide (at least 2 canvas pixels, to stay visible)."""
    scale = max(1, -(-least // resolution))
    return Canvas(size=resolution * scale, brush=max(2, scale))


def _ink(sketch: np.ndarray) -> np.ndarray:
    """The drawn pixels of a canvas: a ``bool [H, W]`` mask as it is (what the page's canvas gives,
    :func:`condistill.demo.canvas.strokes_ink`); an RGBA layer's opaque pixels; dark pixels of a grey or RGB
    image (pen on paper), uint8 or float in [0, 1]."""
    arr = np.asarray(sketch)
    if arr.ndim == 2 and arr.dtype == bool:
        return arr
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise BadInput(f"a sketch must be an image array [H, W] or [H, W, 1|3|4], got shape {arr.shape}")
    values = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
    if values.ndim == 3 and values.shape[2] == 4:
        return values[..., 3] >= 0.5
    grey = values if values.ndim == 2 else values[..., :3].mean(axis=2)
    return grey < 0.5


def sketch_to_edges(sketch: np.ndarray, resolution: int) -> torch.Tensor:
    """The edge condition ``float32 [1, 3, resolution, resolution]`` (0 / 1) of a drawn canvas (its ink:
    see :func:`_ink`).

    The canvas (any size; a non-square one is center-cropped to a square first, as training crops
    its images) is reduced to ``resolution`` by the fraction of each training pixel its strokes
    cover, and a pixel is an edge where that fraction is at least :data:`STROKE_COVERAGE`.
    """
    ink = _ink(sketch)
    height, width = ink.shape
    side = min(height, width)
    if side < 1:
        raise BadInput("the sketch is empty (0 pixels)")
    top, left = (height - side) // 2, (width - side) // 2
    ink = ink[top:top + side, left:left + side]
    covered = Image.fromarray(ink.astype(np.float32), mode="F").resize((resolution, resolution), Image.Resampling.BOX)
    edges = torch.from_numpy(np.asarray(covered) >= STROKE_COVERAGE).to(torch.float32)
    return edges[None, None].repeat(1, 3, 1, 1).contiguous()


def read_upload(path: str | os.PathLike, *, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """The image in an uploaded file, decoded, in RGB; :class:`BadInput` saying what is wrong otherwise."""
    from condistill.data.images import open_image, to_rgb
    from condistill.data.skips import SkipItem

    name = os.path.basename(os.fspath(path))
    try:
        size = os.path.getsize(path)
    except OSError:
        raise BadInput(f"the upload {name!r} could not be read; upload it again") from None
    if size > max_bytes:
        raise BadInput(f"{name} is {size / 2**20:.1f} MB; the demo takes images up to {max_bytes / 2**20:.0f} MB")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise BadInput(f"{name} is not an image this demo can read (PNG, JPEG, WebP, ...); upload an image file") from None
    if width * height > max_pixels:
        raise BadInput(f"{name} is {width}x{height} pixels; the demo takes images up to {max_pixels:,} pixels "
                       f"(e.g. {int(max_pixels ** 0.5)}x{int(max_pixels ** 0.5)}): resize it first")
    try:
        return to_rgb(open_image(os.fspath(path)))
    except SkipItem as exc:
        raise BadInput(f"{name} could not be decoded ({exc.reason}); upload an intact image file") from None


def condition_from_upload(condition, image: Image.Image, *, depth_map: bool = False) -> torch.Tensor:
    """The condition ``[1, C, R, R]`` of an uploaded image for a student trained with ``condition``
    (the one ``load_adapter`` hands back, fitted to the run's resolution R).

    edge, depth: ``condition.control_image(image)``, as training made them. With ``depth_map`` the
    image is itself a depth map (grey, near is bright) and is used as the record's depth. sr: the
    image is the low-resolution input; it is center-cropped square and brought up to R by bicubic
    interpolation, as training brought its degraded images back to size.
    """
    resolution = condition.training_resolution
    if condition.name == "sr":
        from condistill.conditions.sr import bicubic_upscale
        from condistill.conditions.condition import uint8_to_tensor

        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        up = bicubic_upscale(square, (resolution, resolution))
        return uint8_to_tensor(np.asarray(up, dtype=np.uint8))[None].contiguous()
    if condition.name == "depth" and depth_map:
        depth = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return condition.control_image(image, depth=depth)
    try:
        return condition.control_image(image)
    except (FileNotFoundError, ImportError, RuntimeError) as exc:  # e.g. the depth estimator's weights are absent
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " Tick 'the image is a depth map' to give a depth map instead." if condition.name == "depth" else ""
        raise BadInput(f"the {condition.name} condition of this image could not be made: {first}.{hint}") from None


def inpaint_condition(condition, image: Image.Image, mask: np.ndarray) -> torch.Tensor:
    """The inpaint condition ``[1, 4, R, R]`` of ``image`` with the brushed ``mask`` (``[H, W]``, true =
    hole, the image's size): both fitted to the run's resolution as training fits its images, the
    masked pixels cut out and the mask appended."""
    from condistill.conditions.condition import uint8_to_tensor
    from condistill.data.images import fit_record
    from condistill.data.record import Record

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (image.height, image.width):
        raise BadInput(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image {image.width}x{image.height}; "
                       "brush the mask on the uploaded image")
    fitted, _ = fit_record(Record(image=image, masks=mask[None]), condition.training_resolution)
    hole = torch.from_numpy(fitted.masks[0]).to(torch.float32)
    pixels = uint8_to_tensor(np.asarray(fitted.image, dtype=np.uint8))
    return torch.cat([pixels * (1.0 - hole), hole[None]], dim=0)[None].contiguous()
