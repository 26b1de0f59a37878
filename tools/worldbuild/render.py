"""Synthetic scenes rendered once into memory: the training data of the teacher and of the judge."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from condistill.world.judge import ATTRIBUTES
from condistill.world.scenes import SHAPES, attribute_labels, generate_scene

#: added to a pixel's shape class in :attr:`RenderedScenes.dense` where the main object covers it
MAIN_OBJECT = 16


@dataclass
class RenderedScenes:
    """Scenes ``0..N-1`` of a split as arrays.

    Attributes:
        images: ``uint8 [N, H, W, 3]``.
        captions: one caption per scene.
        depth: ``float16 [N, H, W]`` disparity (1 = near), or ``None`` without targets.
        labels: ``int64 [N, 3]`` attribute class indices in the order of ``ATTRIBUTES``, or ``None``.
        dense: ``uint8 [N, H, W]``: per-pixel shape class (0 none, 1 + index in ``SHAPES``) plus
            :data:`MAIN_OBJECT` on the main object, or ``None``.
    """

    images: np.ndarray
    captions: list[str]
    depth: np.ndarray | None = None
    labels: np.ndarray | None = None
    dense: np.ndarray | None = None

    def images_chw(self) -> torch.Tensor:
        """The images as a contiguous ``uint8 [N, 3, H, W]`` tensor."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous()


def render_scenes(split: str, count: int, resolution: int = 64, seed: int = 0,
                  targets: bool = True) -> RenderedScenes:
    """Render scenes ``0..count-1`` of ``split`` (:func:`condistill.world.scenes.generate_scene`).

    With ``targets`` the judge's training targets (depth, attribute labels, dense maps) are
    filled in too; the teacher needs only images and captions.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    captions: list[str] = []
    if targets:
        depth = np.empty((count, resolution, resolution), dtype=np.float16)
        labels = np.empty((count, len(ATTRIBUTES)), dtype=np.int64)
        dense = np.zeros((count, resolution, resolution), dtype=np.uint8)
    for i in range(count):
        rec = generate_scene(i, split, resolution, seed)
        images[i] = np.asarray(rec.image)
        captions.append(rec.caption)
        if not targets:
            continue
        depth[i] = rec.depth
        lab = attribute_labels(rec)
        labels[i] = [lab[a] for a in ATTRIBUTES]
        for k, obj in enumerate(rec.attributes["objects"]):
            dense[i][rec.masks[k]] = 1 + SHAPES.index(obj["shape"])
        dense[i][rec.masks[0]] += MAIN_OBJECT
    if not targets:
        return RenderedScenes(images, captions)
    return RenderedScenes(images, captions, depth, labels, dense)
