#!/usr/bin/env python
"""The edge recipe: ``python recipes/edge.py [options]`` is ``condistill train edge [options]``.

Presets and every option: ``python recipes/edge.py --help`` (the presets live in
condistill/presets.py). Run the same command again with ``--resume latest`` to continue.

    python recipes/edge.py --output-dir runs/edge
    accelerate launch recipes/edge.py --preset sd15-gpu --data my/dataset --output-dir runs/edge-sd15
"""
import sys

from condistill.cli import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("edge"))
