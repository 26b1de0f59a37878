#!/usr/bin/env python
"""The depth recipe: ``python recipes/depth.py [options]`` is ``condistill train depth [options]``.

Presets and every option: ``python recipes/depth.py --help`` (the presets live in
condistill/presets.py). Run the same command again with ``--resume latest`` to continue.

    python recipes/depth.py --output-dir runs/depth
    accelerate launch recipes/depth.py --preset sd15-gpu --data my/dataset --output-dir runs/depth-sd15
"""
import sys

from condistill.cli import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("depth"))
