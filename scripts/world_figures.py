#!/usr/bin/env python
"""Draw docs/images/world_conditions.png: held-out scenes with their depth, edge, sr and
inpaint conditions (one column per scene, one row per view).

    python scripts/world_figures.py --out docs/images/world_conditions.png
"""
import argparse

from condistill.conditions import get_condition
from condistill.plots import grid, to_pil
from condistill.world.scenes import SyntheticScenes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--out", default="docs/images/world_conditions.png")
    args = p.parse_args()
    records = list(SyntheticScenes("heldout", args.count))
    names = ["depth", "edge", "sr", "inpaint"]
    conds = {n: get_condition(n) for n in names}
    rows = [[r.image for r in records]]
    rows += [[to_pil(conds[n](r, seed=i)) if n != "inpaint" else conds[n].to_pil(conds[n](r, seed=i))
              for i, r in enumerate(records)] for n in names]
    grid(rows, ["scene", *names], scale=2).save(args.out)
    for r in records:
        print(r.caption)


if __name__ == "__main__":
    main()
