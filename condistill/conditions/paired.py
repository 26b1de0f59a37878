"""Paired condition: any control type, taken from the data's own control images.

Every item of the data carries its control image (scribbles, soft edges, line art, poses,
segmentation maps, ...): a ``conditioning_image`` column of a ``datasets`` source (the layout
of diffusers' ControlNet training sets), a parallel folder of control images next to an image
folder (``conditioning_dir``), or a ``conditioning.png`` member of webdataset shards. The
control image is fitted with its image (same crop); an item without one, or with one of
another shape, is skipped and reported like any unusable item.

The export records the control type (a free name, such as ``"scribble"``) and the detector
that made the control images, when one did (:mod:`condistill.conditions.detectors`). At
sampling time ``pipe.condistill_condition.control_image(x)`` then runs that detector on a
photo ``x``, or, without a detector, takes ``x`` as the control image as it is.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from condistill.conditions.condition import Condition, register_condition, uint8_to_tensor
from condistill.conditions.detectors import DEFAULT_DETECTOR_PATH, DETECTORS, Detector
from condistill.data.record import Record
from condistill.presets import CPU, GUIDED, SD15_GPU, SDXL_GPU

__all__ = ["PairedCondition"]


class PairedCondition(Condition):
    """The data's own control image as a ``float32 [3, H, W]`` tensor in ``[0, 1]`` (RGB, as stored).

    Options:
        control_type: what the control images are, in a word (``"scribble"``, ``"pose"``); recorded in the
            export and its model card.
        detector: the name of the controlnet-aux detector that made them (:data:`DETECTORS`), or ``None``. With
            one, an item without a control image gets the detector's, and so does a photo at sampling time.
        detector_path: the folder or Hub repository of the detector's weight files.
        detect_resolution: the side the detector works at.
        device: where a network detector runs.
    """

    name = "paired"
    channels = 3
    description = ("any control type: each training item brings its own control image (a conditioning_image "
                   "column, a parallel folder of control images, or a conditioning.png shard member).")
    presets = {
        "cpu-demo": dict(_help="embedded teacher on CPU; give your paired data with --data (data/paired is an "
                               "example)", output_dir="runs/paired", max_steps=700, validate_every=350, **CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU", output_dir="runs/paired-sd15", **SD15_GPU, **GUIDED),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16)", output_dir="runs/paired-sdxl",
                         **SDXL_GPU, **GUIDED),
    }
    fidelity = ("psnr", "higher")

    def __init__(self, *, control_type: str = "control", detector: str | None = None,
                 detector_path: str = DEFAULT_DETECTOR_PATH, detect_resolution: int = 512, device: str = "cpu"):
        if not isinstance(control_type, str) or not control_type.strip() or len(control_type) > 64:
            raise ValueError(f"control_type must be a short name such as 'scribble', got {control_type!r}")
        if detector is not None and detector not in DETECTORS:
            raise ValueError(f"detector must be None or one of {', '.join(DETECTORS)}, got {detector!r}")
        self.control_type = control_type.strip()
        self.detector = detector
        self.detector_path = os.fspath(detector_path)
        self.detect_resolution = detect_resolution
        self.device = device
        self._detector = Detector(detector, self.detector_path, detect_resolution, device) if detector else None

    @property
    def record_conditioning(self) -> str:
        """Whether the data must bring a control image per item ("required") or may ("optional": the detector
        makes the missing ones)."""
        return "optional" if self.detector else "required"

    def card_text(self) -> tuple[str, str]:
        named = "" if self.control_type == "control" else f"{self.control_type} "
        if self._detector is None:
            return f"{self.control_type}-to-image", f"your {named}control image, used as it is"
        return (f"{self.control_type}-to-image",
                f"your photo; the {self.detector} detector makes its {named}control image")

    def check(self) -> None:
        """The detector's weight files, when one is named (:class:`~condistill.conditions.detectors.Detector`)."""
        if self._detector is not None:
            self._detector.check()

    def compute(self, record: Record, seed: int) -> torch.Tensor:
        """The record's control image (or the detector's); ``seed`` is unused."""
        control = record.conditioning
        if control is None:
            if self._detector is None:
                raise ValueError(
                    f"record {record.key!r} has no control image; the paired condition takes each item's own "
                    "(a conditioning_image column, conditioning_dir, or a conditioning.png member), or name the "
                    "detector that makes them (condition option detector)")
            control = self._detector(record.image)
        control = control.convert("RGB")
        if control.size != record.image.size:
            control = control.resize(record.image.size, Image.BICUBIC)
        return uint8_to_tensor(np.asarray(control))

    def control_image(self, image: Image.Image, seed: int = 0, multiple: int = 8, resolution: int | None = None,
                      **record_fields: Any) -> torch.Tensor:
        """:meth:`Condition.control_image`: with a detector, of a photo; without, ``image`` is the control image
        itself (fitted and cropped the same way)."""
        if self._detector is None and isinstance(image, Image.Image):
            record_fields.setdefault("conditioning", image)
        return super().control_image(image, seed, multiple, resolution, **record_fields)

    def fidelity_scores(self, images, data, judge):
        """PSNR and SSIM against the real images of the pairs; with a detector also ``control_distance``, the mean
        absolute difference (0-1) between the detector's control image of each output and the input's."""
        from condistill.evaluation.metrics import psnr, ssim
        from condistill.plots import to_pil

        real = (data["pixel_values"].float() + 1) / 2
        out = {"psnr": float(psnr(images, real)), "ssim": float(ssim(images, real))}
        if self._detector is not None:
            made = torch.stack([uint8_to_tensor(np.asarray(self._detector(to_pil(image)))) for image in images])
            out["control_distance"] = float((made - data["conditioning"].float()).abs().mean())
        return out


register_condition(PairedCondition)
