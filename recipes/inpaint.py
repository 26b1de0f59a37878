#!/usr/bin/env python
"""``python recipes/inpaint.py [options]`` runs ``condistill train inpaint [options]``; ``--help`` lists the presets and options."""
import sys

from condistill.cli import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main("inpaint"))
