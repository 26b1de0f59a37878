"""A judge-free check of generated scene images: background and main-object colour read from pixels."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from condistill.world.scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, parse_caption


def _palette_variants() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Colours a wall/floor/object of each palette entry can take in a scene (see scenes.py)."""
    bg_cols, bg_ids = [], []
    for i, c in enumerate(BACKGROUND_COLOURS.values()):
        c = np.array(c, dtype=np.float32)
        # plain, stripes (dark/light), gradient extremes, floor near/far
        for v in (c, c * 0.82 + 10, c * 1.08 + 6, c * 0.85, c * 1.15, c * 0.62 + 14, c * 0.62 + 32):
            bg_cols.append(np.clip(v, 0, 255))
            bg_ids.append(i)
    obj_cols, obj_ids = [], []
    for i, c in enumerate(OBJECT_COLOURS.values()):
        c = np.array(c, dtype=np.float32)
        for s in (0.91, 1.0, 1.09):
            obj_cols.append(np.clip(c * s, 0, 255))
            obj_ids.append(i)
    return np.stack(bg_cols), np.array(bg_ids), np.stack(obj_cols), np.array(obj_ids)


def pixel_attributes(image, max_distance: float = 60.0, min_pixels: int = 12) -> dict[str, str | None]:
    """A judge-free guess of a scene image's background colour and main object colour.

    Background: majority vote of the top quarter of rows (the wall) over the background
    palette. Main object: pixels are assigned to the nearest object colour when that is
    closer than every wall/floor colour and within ``max_distance``; the main object is
    the nearest one, i.e. the colour whose pixels reach lowest in the picture. Used as a
    sanity check of generated samples (validated against real scenes by the evaluation
    recipe); the trained judge is the real measure.
    """
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    H = arr.shape[0]
    bg_cols, bg_ids, obj_cols, obj_ids = _palette_variants()
    px = arr.reshape(-1, 3)
    d_bg = np.linalg.norm(px[:, None, :] - bg_cols[None], axis=2)  # [P, Vb]
    d_obj = np.linalg.norm(px[:, None, :] - obj_cols[None], axis=2)  # [P, Vo]
    top = np.arange(px.shape[0]) < (H // 4) * arr.shape[1]
    near_bg = d_bg.argmin(1)
    top_votes = np.bincount(bg_ids[near_bg[top & (d_bg.min(1) < max_distance)]], minlength=len(BACKGROUND_COLOURS))
    background = list(BACKGROUND_COLOURS)[int(top_votes.argmax())] if top_votes.sum() else None

    is_obj = (d_obj.min(1) < np.minimum(d_bg.min(1), max_distance))
    obj_class = obj_ids[d_obj.argmin(1)]
    rows = np.arange(px.shape[0]) // arr.shape[1]
    best, best_key = None, None
    for k in range(len(OBJECT_COLOURS)):
        sel = is_obj & (obj_class == k)
        n = int(sel.sum())
        if n < min_pixels:
            continue
        key = (float(np.percentile(rows[sel], 95)), n)
        if best_key is None or key > best_key:
            best, best_key = k, key
    colour = list(OBJECT_COLOURS)[best] if best is not None else None
    return {"background": background, "colour": colour}


def heuristic_score(images, prompts: Sequence[str]) -> dict:
    """Fraction of images whose :func:`pixel_attributes` match what each prompt names."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    hits = {"background": [], "colour": [], "both": []}
    for im, prompt in zip(images, prompts):
        want, got = parse_caption(prompt), pixel_attributes(im)
        b, c = got["background"] == want["background"], got["colour"] == want["colour"]
        hits["background"].append(b)
        hits["colour"].append(c)
        hits["both"].append(b and c)
    return {k: float(np.mean(v)) for k, v in hits.items()} | {"n_images": len(images)}
