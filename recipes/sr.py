#!/usr/bin/env python
"""The sr recipe: ``python recipes/sr.py [options]`` is ``condistill train sr [options]``.

Presets and every option: ``python recipes/sr.py --help`` (the presets live in
condistill/presets.py). Run the same command again with ``--resume latest`` to continue.

    python recipes/sr.py --output-dir runs/sr
    accelerate launch recipes/sr.py --preset sd15-gpu --data my/dataset --output-dir runs/sr-sd15
"""
import sys

from condistill.cli import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("sr"))
