"""Named starting points of the per-condition recipes (``condistill train CONDITION --preset P``).

A preset is a partial :class:`~condistill.config.DistillConfig`; options given on the command
line override it. ``cpu-demo`` (the default) uses the embedded tiny teacher and the synthetic
scenes and finishes on a laptop CPU; ``sd15-gpu`` is the starting point for Stable Diffusion 1.5 and
``sdxl-gpu`` for SDXL (docs/sdxl.md).
The ``_help`` entry of a preset is its one-line description in ``--help``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "DEFAULT_PRESET", "recipe_description", "presets_for"]

DEFAULT_PRESET = "cpu-demo"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"

_CPU = dict(batch_size=16, learning_rate=1e-3, ema_decay=0.9, checkpoint_every=100, threads=0)
_SD15_GPU = dict(base=SD15, resolution=512, batch_size=8, learning_rate=1e-5, ema_decay=0.999, max_steps=10000,
                 mixed_precision="fp16", gradient_checkpointing=True, checkpoint_every=1000, validate_every=500)
# SDXL at its native 1024 px: bf16 (its VAE overflows in fp16), checkpointing, a smaller batch
_SDXL_GPU = dict(_SD15_GPU, base=SDXL, resolution=1024, batch_size=4, mixed_precision="bf16")
_GUIDED = dict(guidance_min=1.0, guidance_max=4.0)

#: condition -> (what the condition is, {preset name: options})
RECIPES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "edge": ("edge-to-image: the condition is the canny edge map of each training image.", {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (edge: 700 steps, about 9 minutes on a "
                               "quiet 2-core CPU)", output_dir="runs/edge", max_steps=700, validate_every=350, **_CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU", output_dir="runs/edge-sd15", **_SD15_GPU, **_GUIDED,
                         condition_options={"low_threshold": 100, "high_threshold": 200}),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16)", output_dir="runs/edge-sdxl", **_SDXL_GPU,
                         **_GUIDED, condition_options={"low_threshold": 100, "high_threshold": 200}),
    }),
    "depth": ("depth-to-image: the condition is a depth map (the dataset's own depth or a depth estimator).", {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (400 steps; 11-13 minutes as one of three "
                               "runs sharing 2 cores, see docs/results.md)", output_dir="runs/depth", max_steps=400,
                         validate_every=100, **_CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU with a local MiDaS folder", output_dir="runs/depth-sd15", **_SD15_GPU,
                         **_GUIDED,
                         condition_options={"source": "estimator", "estimator_path": "lllyasviel/Annotators"}),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16) with a local MiDaS folder",
                         output_dir="runs/depth-sdxl", **_SDXL_GPU, **_GUIDED,
                         condition_options={"source": "estimator", "estimator_path": "lllyasviel/Annotators"}),
    }),
    "sr": ("super-resolution: the condition is a randomly degraded low-resolution copy brought back to size.", {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (2400 steps, the EMA slowed from 0.9 to "
                               "0.99 after step 1600; see docs/results.md)", output_dir="runs/sr", max_steps=2400,
                         ema_decay_late=0.99, ema_late_from=1600, validate_every=100, **_CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU", output_dir="runs/sr-sd15", **_SD15_GPU),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16)", output_dir="runs/sr-sdxl", **_SDXL_GPU),
    }),
    "inpaint": ("inpainting: the condition is the masked image plus the mask (rectangles and brush strokes).", {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (1000 steps, about 1 s each on one core; "
                               "see docs/results.md)", output_dir="runs/inpaint", max_steps=1000, validate_every=100,
                         **_CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU", output_dir="runs/inpaint-sd15", **_SD15_GPU, **_GUIDED),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16)", output_dir="runs/inpaint-sdxl",
                         **_SDXL_GPU, **_GUIDED),
    }),
}


def _recipe(condition: str) -> tuple[str, dict[str, dict[str, Any]]]:
    try:
        return RECIPES[condition]
    except KeyError:
        raise ValueError(f"no recipe for condition {condition!r}; choose one of {sorted(RECIPES)}") from None


def presets_for(condition: str) -> dict[str, dict[str, Any]]:
    """The presets of ``condition``'s recipe."""
    return _recipe(condition)[1]


def recipe_description(condition: str) -> str:
    """The first lines of ``condistill train CONDITION --help``."""
    return f"Distil a frozen text-to-image teacher into a few-step {condition} model. {_recipe(condition)[0]}"
