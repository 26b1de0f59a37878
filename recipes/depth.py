#!/usr/bin/env python
"""Distil a frozen text-to-image teacher into a few-step depth model.

depth-to-image: the condition is a depth map (the dataset's own depth or a depth estimator).
Defaults (preset ``cpu-demo``) use the embedded tiny teacher and synthetic scenes and
finish on a laptop CPU; ``--preset sd15-gpu`` is the starting point for Stable Diffusion 1.5.

    python recipes/depth.py --output-dir runs/depth
    accelerate launch recipes/depth.py --preset sd15-gpu --data my/dataset --output-dir runs/depth-sd15
"""
from condistill.recipe import recipe_main

PRESETS = {
    "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (400 steps; 11-13 minutes as one of three runs sharing 2 cores, see docs/results.md)", output_dir="runs/depth",
                     batch_size=16, max_steps=400, learning_rate=1e-3, ema_decay=0.9, checkpoint_every=100,
                     validate_every=100, threads=0),
    "sd15-gpu": dict(_help="SD 1.5 on one GPU with a local MiDaS folder", base="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512, batch_size=8, learning_rate=1e-5, ema_decay=0.999, max_steps=10000, mixed_precision="fp16", gradient_checkpointing=True, checkpoint_every=1000, validate_every=500, guidance_min=1.0, guidance_max=4.0, condition_options={"source": "estimator", "estimator_path": "lllyasviel/Annotators"}),
}

if __name__ == "__main__":
    recipe_main("depth", PRESETS, __doc__.split("\n\n")[0])
