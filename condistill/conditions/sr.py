"""Super-resolution condition: a randomly degraded low-resolution copy, upscaled back.

The degradation follows the usual blind-SR order: optional Gaussian blur of the
high-resolution image, down-scaling by a factor drawn from ``scales``, optional
Gaussian noise, optional JPEG re-encoding. Every random choice comes from the seed, so
``degrade(image, seed)`` is reproducible and the evaluation and the baselines can
rebuild exactly the low-resolution input a model saw.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from condistill.presets import CPU, SD15_GPU, SDXL_GPU
from condistill.conditions.condition import (
    check_seed,
    Condition,
    check_probability,
    check_range,
    register_condition,
    uint8_to_tensor,
)
from condistill.data.record import Record
from condistill.seeding import numpy_rng

__all__ = ["SRCondition", "bicubic_upscale"]

_SALT = 0x5352  # "SR": keeps this condition's random stream apart from the others
_RESAMPLE = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "area": Image.BOX,
    "nearest": Image.NEAREST,
}


def bicubic_upscale(low: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``low`` to ``size = (width, height)`` with bicubic interpolation (RGB out).

    This is the SR condition's own upsampling and the classic "bicubic" SR baseline.
    """
    if not isinstance(low, Image.Image):
        raise TypeError(f"bicubic_upscale expects a PIL.Image, got {type(low).__name__}")
    if (
        not isinstance(size, Sequence) or len(size) != 2
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size)
    ):
        raise ValueError(f"size must be (width, height) in positive integers, got {size!r}")
    return low.convert("RGB").resize((int(size[0]), int(size[1])), Image.BICUBIC)


class SRCondition(Condition):
    """Bicubic upscaling of a degraded low-resolution copy: ``float32 [3, H, W]`` in ``[0, 1]``.

    Options (ranges are ``(min, max)``, drawn uniformly per seed):
        scales: down-scaling factors to draw from, uniformly (default ``(2, 4, 8)``);
            pass one value, e.g. ``(4,)``, for a fixed-factor model.
        downsample: kernel for down-scaling: ``"bicubic"`` (default, antialiased),
            ``"bilinear"``, ``"area"`` or ``"nearest"``.
        blur_probability / blur_sigma: chance (default 0.5) of a Gaussian blur of the
            high-resolution image before down-scaling, with standard deviation in
            high-resolution pixels (default ``(0.4, 1.6)``).
        noise_probability / noise_std: chance (default 0.5) of additive Gaussian noise
            on the low-resolution image, standard deviation in ``[0, 1]`` intensity
            units (default ``(0.005, 0.04)``).
        jpeg_probability / jpeg_quality: chance (default 0.5) of JPEG re-encoding the
            low-resolution image at an integer quality (default ``(40, 95)``).
    """

    name = "sr"
    channels = 3
    #: the recipe of ``condistill train sr`` (:mod:`condistill.presets`)
    description = "super-resolution: the condition is a randomly degraded low-resolution copy brought back to size."
    presets = {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (2400 steps, the EMA slowed from 0.9 to "
                               "0.99 after step 1600; see docs/results.md)", output_dir="runs/sr", max_steps=2400,
                         ema_decay_late=0.99, ema_late_from=1600, validate_every=100, **CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU", output_dir="runs/sr-sd15", **SD15_GPU),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16)", output_dir="runs/sr-sdxl", **SDXL_GPU),
    }
    fidelity = ("psnr", "higher")

    @classmethod
    def distillation_target(cls, rows):
        s, b = rows.get("student-4"), rows.get("bicubic")
        if s is None or b is None:
            return None
        ok = s["psnr"] >= b["psnr"] - 1 and s["frechet_distance"] < b["frechet_distance"]
        return f"PSNR >= bicubic - 1 ({b['psnr'] - 1:.2f}) and FD < bicubic ({b['frechet_distance']:.1f})", ok

    def fidelity_scores(self, images, data, judge):
        """PSNR and SSIM against the real high-resolution images."""
        from condistill.evaluation.metrics import psnr, ssim

        real = (data["pixel_values"] + 1) / 2
        return {"psnr": float(psnr(images, real)), "ssim": float(ssim(images, real))}

    def __init__(self, *, scales: Sequence[float] = (2, 4, 8), downsample: str = "bicubic",
                 blur_probability: float = 0.5, blur_sigma: Sequence[float] = (0.4, 1.6),
                 noise_probability: float = 0.5, noise_std: Sequence[float] = (0.005, 0.04),
                 jpeg_probability: float = 0.5, jpeg_quality: Sequence[int] = (40, 95)):
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
            raise ValueError(f"scales must be a non-empty list of factors >= 1, e.g. (2, 4, 8); got {scales!r}")
        for s in scales:
            if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not s >= 1:
                raise ValueError(f"every scale must be a number >= 1, got {s!r} in {scales!r}")
        if downsample not in _RESAMPLE:
            raise ValueError(f"downsample must be one of {sorted(_RESAMPLE)}, got {downsample!r}")
        self.scales = tuple(int(s) if float(s).is_integer() else float(s) for s in scales)
        self.downsample = downsample
        self.blur_probability = check_probability("blur_probability", blur_probability)
        self.blur_sigma = check_range("blur_sigma", blur_sigma, 0.0, 50.0)
        self.noise_probability = check_probability("noise_probability", noise_probability)
        self.noise_std = check_range("noise_std", noise_std, 0.0, 1.0)
        self.jpeg_probability = check_probability("jpeg_probability", jpeg_probability)
        self.jpeg_quality = check_range("jpeg_quality", jpeg_quality, 1, 100, integer=True)

    def degradation_params(self, seed: int) -> dict[str, Any]:
        """The degradation drawn for ``seed``.

        Returns a dict with ``scale``, ``blur_sigma`` (0 = no blur), ``noise_std``
        (0 = no noise), ``jpeg_quality`` (``None`` = no JPEG) and ``noise_seed``. Every
        random number is drawn whatever the outcome, so changing one probability does
        not reshuffle the other choices.
        """
        rng = numpy_rng(check_seed(seed), _SALT)
        scale = self.scales[int(rng.integers(len(self.scales)))]
        do_blur, do_noise, do_jpeg = rng.random(3)
        sigma = float(rng.uniform(*self.blur_sigma))
        std = float(rng.uniform(*self.noise_std))
        quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
        noise_seed = int(rng.integers(2**32))
        return {
            "scale": scale,
            "blur_sigma": sigma if do_blur < self.blur_probability else 0.0,
            "noise_std": std if do_noise < self.noise_probability else 0.0,
            "jpeg_quality": quality if do_jpeg < self.jpeg_probability else None,
            "noise_seed": noise_seed,
        }

    def degrade(self, image: Image.Image, seed: int = 0) -> Image.Image:
        """The low-resolution RGB image for ``(image, seed)``.

        Its size is ``(round(W / scale), round(H / scale))`` (at least 1 pixel) for the
        scale in :meth:`degradation_params`.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"degrade expects a PIL.Image, got {type(image).__name__}")
        params = self.degradation_params(seed)
        hr = image.convert("RGB")
        if params["blur_sigma"] > 0:
            hr = hr.filter(ImageFilter.GaussianBlur(radius=params["blur_sigma"]))
        width, height = hr.size
        low_size = (max(1, round(width / params["scale"])), max(1, round(height / params["scale"])))
        low = hr.resize(low_size, _RESAMPLE[self.downsample])
        if params["noise_std"] > 0:
            noise_rng = numpy_rng(params["noise_seed"])
            pixels = np.asarray(low, dtype=np.float32) / 255.0
            pixels = pixels + noise_rng.normal(0.0, params["noise_std"], pixels.shape).astype(np.float32)
            low = Image.fromarray(np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8), "RGB")
        if params["jpeg_quality"] is not None:
            buffer = io.BytesIO()
            low.save(buffer, format="JPEG", quality=params["jpeg_quality"])
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                low = decoded.convert("RGB")
        return low

    bicubic_upscale = staticmethod(bicubic_upscale)

    def start_image(self, cond: torch.Tensor) -> torch.Tensor:
        """The up-scaled low-resolution input itself, in ``[-1, 1]``."""
        return self._check_batch(cond) * 2.0 - 1.0

    def compute(self, record: Record, seed: int) -> torch.Tensor:
        """Degrade ``record.image`` with ``seed`` and bring it back to full size (bicubic)."""
        low = self.degrade(record.image, seed)
        up = bicubic_upscale(low, record.image.size)
        return uint8_to_tensor(np.asarray(up, dtype=np.uint8))


register_condition(SRCondition)
