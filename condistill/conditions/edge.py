"""Edge condition: a binary Canny edge map, replicated to three channels.

Edges come from controlnet-aux's ``CannyDetector`` (OpenCV Canny on the RGB image) at
the image's own resolution, so edge pixels sit exactly on the outlines of the input.
A dataset that ships its own control images (a ``conditioning_image`` column, exposed
as ``Record.conditioning``) can be used as-is with ``use_record_conditioning=True``.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from condistill.presets import CPU, SD15_GPU, SDXL_GPU, GUIDED
from condistill.conditions.condition import Condition, import_controlnet_aux, register_condition
from condistill.data.record import Record

__all__ = ["EdgeCondition", "canny_edges"]

# CannyDetector resizes its input so the short side equals `detect_resolution` and both
# sides are multiples of 64; padding to multiples of 64 keeps it at 1:1 scale.
_DETECTOR_MULTIPLE = 64
_detector = None


def _canny_detector():
    global _detector
    if _detector is None:
        _detector = import_controlnet_aux("CannyDetector")()
    return _detector


def _check_thresholds(low_threshold, high_threshold) -> None:
    for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2040:
            raise ValueError(f"{name} must be a number in [0, 2040] (Sobel gradient units), got {value!r}")
    if low_threshold > high_threshold:
        raise ValueError(
            f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold}); swap them"
        )


def canny_edges(image: Image.Image | np.ndarray, low_threshold: float = 50, high_threshold: float = 100) -> np.ndarray:
    """Binary Canny edge map of an RGB image at its own resolution.

    Args:
        image: ``PIL.Image`` (any mode, converted to RGB) or ``uint8`` array
            ``[H, W, 3]`` / ``[H, W]``.
        low_threshold, high_threshold: Canny hysteresis thresholds on the L1 Sobel
            gradient (a step of ``d`` grey levels gives about ``4 d``).

    Returns:
        ``bool`` array ``[H, W]``, ``True`` on edge pixels. Also used by the evaluation
        (edge F1 of ``canny(output)`` against the input edges).
    """
    _check_thresholds(low_threshold, high_threshold)
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        array = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    else:
        raise TypeError("canny_edges expects a PIL.Image or a uint8 array [H, W, 3] or [H, W]")
    if array.shape[2] != 3:
        raise ValueError(f"canny_edges expects 3 colour channels, got an array of shape {array.shape}")
    height, width = array.shape[:2]
    pad_h = -height % _DETECTOR_MULTIPLE
    pad_w = -width % _DETECTOR_MULTIPLE
    padded = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    short = min(padded.shape[:2])
    out = _canny_detector()(
        padded, low_threshold=low_threshold, high_threshold=high_threshold,
        detect_resolution=short, image_resolution=short, output_type="np",
    )
    if out.shape[:2] != padded.shape[:2]:  # pragma: no cover - guards a controlnet-aux behaviour change
        raise RuntimeError(f"CannyDetector changed the image size from {padded.shape[:2]} to {out.shape[:2]}")
    return np.ascontiguousarray(out[:height, :width, 0] > 127)


class EdgeCondition(Condition):
    """Canny edges as a ``float32 [3, H, W]`` tensor of 0s and 1s (1 = edge).

    Options:
        low_threshold: Canny low hysteresis threshold (default 50).
        high_threshold: Canny high hysteresis threshold (default 100). The defaults
            find object outlines, the horizon and wall stripes of the 64x64 synthetic
            scenes while ignoring their pixel noise; photos usually want ``100/200``,
            the ControlNet training default.
        use_record_conditioning: when ``True`` and a record carries a dataset-provided
            ``conditioning`` image, use it (converted to grey, resized with nearest
            neighbour to the image size, thresholded at 50%) instead of running Canny.
            Records without one still get Canny edges.
    """

    name = "edge"
    channels = 3
    #: the recipe of ``condistill train edge`` (:mod:`condistill.presets`)
    description = "edge-to-image: the condition is the canny edge map of each training image."
    presets = {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (edge: 700 steps, about 9 minutes on a "
                               "quiet 2-core CPU)", output_dir="runs/edge", max_steps=700, validate_every=350, **CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU", output_dir="runs/edge-sd15", **SD15_GPU, **GUIDED,
                         condition_options={"low_threshold": 100, "high_threshold": 200}),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16)", output_dir="runs/edge-sdxl", **SDXL_GPU,
                         **GUIDED, condition_options={"low_threshold": 100, "high_threshold": 200}),
    }
    fidelity = ("edge_f1", "higher")

    def fidelity_scores(self, images, data, judge):
        """Edge F1 (1-pixel tolerance) of the Canny edges of the images, at this condition's thresholds, against the
        input edges."""
        from condistill.evaluation.metrics import edge_f1, edge_maps

        target = data["conditioning"][:, 0] > 0.5
        maps = edge_maps(images, self.low_threshold, self.high_threshold)
        return {"edge_f1": float(edge_f1(maps, target, tolerance=1))}

    @classmethod
    def teacher_bar(cls, s, t):
        return f"F1 >= 2 x teacher ({2 * t['edge_f1']:.3f})", s["edge_f1"] >= 2 * t["edge_f1"]

    def __init__(self, *, low_threshold: float = 50, high_threshold: float = 100,
                 use_record_conditioning: bool = False):
        _check_thresholds(low_threshold, high_threshold)
        if not isinstance(use_record_conditioning, bool):
            raise ValueError(f"use_record_conditioning must be True or False, got {use_record_conditioning!r}")
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.use_record_conditioning = use_record_conditioning

    def edges(self, record: Record) -> np.ndarray:
        """The ``bool [H, W]`` edge map this condition uses for ``record``."""
        image = record.image
        if self.use_record_conditioning and record.conditioning is not None:
            given = record.conditioning
            if not isinstance(given, Image.Image):
                raise TypeError(
                    f"record.conditioning must be a PIL.Image, got {type(given).__name__}; "
                    "fix the data source or set use_record_conditioning=False"
                )
            grey = given.convert("L")
            if grey.size != image.size:
                grey = grey.resize(image.size, Image.NEAREST)
            return np.asarray(grey) >= 128
        return canny_edges(image, self.low_threshold, self.high_threshold)

    def compute(self, record: Record, seed: int) -> torch.Tensor:
        """Edges of ``record`` replicated to three channels; ``seed`` is unused (edges are deterministic)."""
        edges = torch.from_numpy(self.edges(record)).to(torch.float32)
        return edges.unsqueeze(0).repeat(3, 1, 1)


register_condition(EdgeCondition)
