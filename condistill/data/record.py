"""The one record type every data source yields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Record:
    """One training or evaluation example.

    Attributes:
        image: RGB ``PIL.Image`` (mode ``"RGB"``), already at the source's output resolution.
        caption: text prompt; may be empty.
        depth: optional ``float32`` array ``[H, W]`` in ``[0, 1]``, *disparity-like*:
            1 = nearest, 0 = farthest (the ControlNet depth convention: near is bright).
        masks: optional ``bool`` array ``[K, H, W]``, one visible-region mask per object.
        conditioning: optional ``PIL.Image`` given by the dataset itself (e.g. a
            ``conditioning_image`` column); conditions may use it instead of computing one.
        attributes: free-form metadata (synthetic scenes store the scene graph here).
        key: a stable identifier (file name, dataset index, scene id).
    """

    image: Image.Image
    caption: str = ""
    depth: np.ndarray | None = None
    masks: np.ndarray | None = None
    conditioning: Image.Image | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    key: str = ""
