#!/usr/bin/env python
"""Distil a frozen text-to-image teacher into a few-step edge model.

edge-to-image: the condition is the canny edge map of each training image.
Defaults (preset ``cpu-demo``) use the embedded tiny teacher and synthetic scenes and
finish on a laptop CPU; ``--preset sd15-gpu`` is the starting point for Stable Diffusion 1.5.

    python recipes/edge.py --output-dir runs/edge
    accelerate launch recipes/edge.py --preset sd15-gpu --data my/dataset --output-dir runs/edge-sd15
"""
from condistill.recipe import recipe_main

PRESETS = {
    "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (edge: 700 steps, about 9 minutes on a quiet 2-core CPU)", output_dir="runs/edge",
                     batch_size=16, max_steps=700, learning_rate=1e-3, ema_decay=0.9, checkpoint_every=100,
                     validate_every=350, threads=0),
    "sd15-gpu": dict(_help="SD 1.5 on one GPU", base="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512, batch_size=8, learning_rate=1e-5, ema_decay=0.999, max_steps=10000, mixed_precision="fp16", gradient_checkpointing=True, checkpoint_every=1000, validate_every=500, guidance_min=1.0, guidance_max=4.0, condition_options={"low_threshold": 100, "high_threshold": 200}),
}

if __name__ == "__main__":
    recipe_main("edge", PRESETS, __doc__.split("\n\n")[0])
