#!/usr/bin/env python
"""Distil a frozen text-to-image teacher into a few-step sr model.

super-resolution: the condition is a randomly degraded low-resolution copy brought back to size.
Defaults (preset ``cpu-demo``) use the embedded tiny teacher and synthetic scenes and
finish on a laptop CPU; ``--preset sd15-gpu`` is the starting point for Stable Diffusion 1.5.

    python recipes/sr.py --output-dir runs/sr
    accelerate launch recipes/sr.py --preset sd15-gpu --data my/dataset --output-dir runs/sr-sd15
"""
from condistill.recipe import recipe_main

PRESETS = {
    "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (2400 steps, the EMA slowed from 0.9 to 0.99 after step 1600; see docs/results.md)", output_dir="runs/sr",
                     batch_size=16, max_steps=2400, learning_rate=1e-3, ema_decay=0.9, ema_decay_late=0.99, ema_late_from=1600, checkpoint_every=100,
                     validate_every=100, threads=0),
    "sd15-gpu": dict(_help="SD 1.5 on one GPU", base="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512, batch_size=8, learning_rate=1e-5, ema_decay=0.999, max_steps=10000, mixed_precision="fp16", gradient_checkpointing=True, checkpoint_every=1000, validate_every=500),
}

if __name__ == "__main__":
    recipe_main("sr", PRESETS, __doc__.split("\n\n")[0])
