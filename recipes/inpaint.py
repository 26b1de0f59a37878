#!/usr/bin/env python
"""The inpaint recipe: ``python recipes/inpaint.py [options]`` is ``condistill train inpaint [options]``.

Presets and every option: ``python recipes/inpaint.py --help`` (the presets live in
condistill/presets.py). Run the same command again with ``--resume latest`` to continue.

    python recipes/inpaint.py --output-dir runs/inpaint
    accelerate launch recipes/inpaint.py --preset sd15-gpu --data my/dataset --output-dir runs/inpaint-sd15
"""
import sys

from condistill.cli import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("inpaint"))
