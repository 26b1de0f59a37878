"""Procedural synthetic scenes: the embedded world condistill trains and measures on.

Each scene is a room seen from the front: a wall in the background colour above a
horizon, a darker floor below it, and one to three flat objects standing on the floor.
Objects lower in the picture are nearer and occlude the ones behind them. Every scene
comes with a caption, an exact depth map and one visible-region mask per object, and
is a pure function of ``(seed, split, index)``: the same call always returns the same
pixels, and the ``train`` and ``heldout`` splits draw from different random streams.

The *main* object (``attributes["objects"][0]``) is always the nearest one, so it is
drawn last and fully visible, and it is the first thing the caption names.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from condistill.data.record import Record
from condistill.seeding import numpy_rng

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 195),
    "orange": (250, 140, 25),
    "cyan": (40, 205, 215),
    "pink": (245, 125, 185),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (232, 232, 228),
    "gray": (128, 128, 128),
    "black": (28, 28, 32),
    "brown": (120, 78, 45),
    "navy": (28, 38, 98),
    "olive": (108, 118, 44),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.14, "large": 0.2}  # half-extent / resolution
BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "striped")
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}

WALL_DISPARITY = 0.05
FLOOR_NEAR, FLOOR_FAR = 1.0, 0.15


def vocabulary() -> list[str]:
    """Every word a scene caption can contain (used to build the tiny teacher's tokenizer)."""
    words = {"a", "an", "and", "of", "left", "right", "on", "background", "behind"}
    words |= set(OBJECT_COLOURS) | set(BACKGROUND_COLOURS) | set(SHAPES) | set(SIZES)
    words |= set(BACKGROUND_STYLES)
    return sorted(words)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, pixels
    cy: float
    extent: float  # half-extent, pixels
    disparity: float  # 1 = near, 0 = far

    def as_dict(self) -> dict:
        """The fields by name, in declaration order."""
        return asdict(self)


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.9) & (np.abs(dy) <= r * 0.9)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.15
    if shape == "triangle":
        # apex up, base at cy + r; the half-width grows linearly from apex to base
        frac = (dy + r) / (2 * r)
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r * 1.1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(obj: SceneObject) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}"


def make_caption(objects: Sequence[SceneObject], background: str, style: str) -> str:
    """Caption naming the main (first) object, its relation to a second one, and the background."""
    main = objects[0]
    text = f"{_article(main.size)} {_describe(main)}"
    if len(objects) > 1:
        other = objects[1]
        rel = "left of" if main.cx < other.cx else "right of"
        text += f" {rel} {_article(other.size)} {_describe(other)}"
    if len(objects) > 2:
        third = objects[2]
        text += f" and {_article(third.size)} {_describe(third)}"
    text += f" on {_article(style)} {style} {background} background"
    return text


def generate_scene(index: int, split: str = "train", resolution: int = 64, seed: int = 0) -> Record:
    """Render scene ``index`` of ``split``.

    Returns a :class:`Record` whose image is ``resolution x resolution`` RGB, ``depth`` is
    float32 ``[H, W]`` (1 = near), ``masks`` is bool ``[K, H, W]`` (visible pixels of each
    object, main object first) and ``attributes`` holds the scene graph.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if resolution < 16:
        raise ValueError(f"resolution must be at least 16 pixels, got {resolution}")
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    rng = numpy_rng(seed, SPLITS[split], index)
    R = resolution
    yy, xx = np.mgrid[0:R, 0:R].astype(np.float32) + 0.5

    bg_name = list(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    style = BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))]
    bg = np.array(BACKGROUND_COLOURS[bg_name], dtype=np.float32)
    horizon = R * rng.uniform(0.32, 0.48)

    # wall
    wall = np.broadcast_to(bg, (R, R, 3)).copy()
    if style == "gradient":
        shade = 1.0 + 0.35 * (yy / R - 0.5)[..., None] * (1 if rng.random() < 0.5 else -1)
        wall = wall * shade + 18.0 * (yy / R - 0.5)[..., None]
    elif style == "striped":
        period = R / rng.integers(5, 9)
        stripes = (np.floor(yy / period) % 2 == 0)[..., None]
        wall = np.where(stripes, wall * 0.82 + 10, wall * 1.08 + 6)
    # floor: a darker, slightly graded version of the background colour
    on_floor = yy >= horizon
    floor_t = np.clip((yy - horizon) / max(R - horizon, 1.0), 0, 1)
    floor = bg * 0.62 + 14.0 + (18.0 * floor_t)[..., None]
    image = np.where(on_floor[..., None], floor, wall)
    depth = np.where(on_floor, FLOOR_FAR + (FLOOR_NEAR - FLOOR_FAR) * floor_t, WALL_DISPARITY).astype(np.float32)

    # objects: draw base positions, nearest first for the caption, painted far to near
    n_obj = int(rng.integers(1, 4))
    colours = rng.permutation(len(OBJECT_COLOURS))[:n_obj]
    # the first object gets the lowest base line (nearest) and is never small
    base_ys = np.sort(rng.uniform(horizon + 2, R - 1, size=n_obj))[::-1]
    objects: list[SceneObject] = []
    for i in range(n_obj):
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = list(SIZES)[rng.integers(len(SIZES))] if i else ("medium", "large")[rng.integers(2)]
        r = SIZES[size] * R
        cx = rng.uniform(r + 1, R - r - 1)
        base_y = max(base_ys[i], base_ys[0] + 0.5) if i == 0 else min(base_ys[i], base_ys[0] - 0.5)
        cy = min(base_y - r, R - r - 1)
        cy = max(cy, r + 1)
        t = np.clip((cy + r - horizon) / max(R - horizon, 1.0), 0, 1)
        objects.append(
            SceneObject(shape, list(OBJECT_COLOURS)[colours[i]], size, float(cx), float(cy), float(r),
                        float(FLOOR_FAR + (FLOOR_NEAR - FLOOR_FAR) * t))
        )
    # main object = nearest; clamping at the image border can tie disparities, so the
    # main object keeps the front slot (it is painted last) whatever its disparity
    order = [0] + sorted(range(1, n_obj), key=lambda j: -objects[j].disparity)
    objects = [objects[j] for j in order]

    owner = np.full((R, R), -1, dtype=np.int64)
    for j in reversed(range(n_obj)):  # far to near, so nearer objects overwrite
        obj = objects[j]
        m = _shape_mask(obj.shape, obj.cx, obj.cy, obj.extent, yy, xx)
        colour = np.array(OBJECT_COLOURS[obj.colour], dtype=np.float32)
        # a soft vertical shade gives the objects some volume
        shade = 1.0 - 0.18 * np.clip((yy - obj.cy) / (2 * obj.extent), -0.5, 0.5)
        image = np.where(m[..., None], colour * shade[..., None], image)
        depth = np.where(m, obj.disparity, depth)
        owner[m] = j
    masks = np.stack([owner == j for j in range(n_obj)])

    image = np.clip(image + rng.normal(0, 2.0, image.shape), 0, 255).astype(np.uint8)
    attributes = {
        "background": {"colour": bg_name, "style": style},
        "horizon": float(horizon),
        "objects": [o.as_dict() for o in objects],
        "split": split,
        "index": int(index),
        "seed": int(seed),
    }
    return Record(
        image=Image.fromarray(image, "RGB"),
        caption=make_caption(objects, bg_name, style),
        depth=depth.astype(np.float32),
        masks=masks,
        attributes=attributes,
        key=f"synthetic-{split}-{seed}-{index:07d}",
    )


class SyntheticScenes(Sequence):
    """A sized, indexable collection of synthetic scenes (a :class:`Record` per index)."""

    def __init__(self, split: str = "train", size: int = 10000, resolution: int = 64, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        if size < 1:
            raise ValueError(f"size must be a positive number of scenes, got {size}")
        self.split, self.size, self.resolution, self.seed = split, int(size), int(resolution), int(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"scene index {index} out of range for {self.size} scenes")
        return generate_scene(index, self.split, self.resolution, self.seed)

    def __repr__(self) -> str:
        return f"SyntheticScenes(split={self.split!r}, size={self.size}, resolution={self.resolution}, seed={self.seed})"


def attribute_labels(record: Record) -> dict[str, int]:
    """Integer class labels of a synthetic record (what the judge predicts)."""
    attrs = record.attributes
    main = attrs["objects"][0]
    return {
        "background": list(BACKGROUND_COLOURS).index(attrs["background"]["colour"]),
        "colour": list(OBJECT_COLOURS).index(main["colour"]),
        "shape": SHAPES.index(main["shape"]),
    }


def parse_caption(caption: str) -> dict[str, str | None]:
    """Recover background colour and main object colour/shape from a scene caption.

    Returns ``None`` for a field the caption does not name. Used to score generated
    images against their prompts.
    """
    words = caption.lower().replace(",", " ").split()
    out: dict[str, str | None] = {"background": None, "colour": None, "shape": None}
    for w in words:
        if out["colour"] is None and w in OBJECT_COLOURS:
            out["colour"] = w
        if out["shape"] is None and w in SHAPES:
            out["shape"] = w
    if "background" in words:
        i = words.index("background")
        for w in reversed(words[:i]):
            if w in BACKGROUND_COLOURS:
                out["background"] = w
                break
    return out


def _grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        canvas.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return canvas


def image_grid(images: Sequence[Image.Image], cols: int = 8) -> Image.Image:
    """Paste equally sized images into a grid, row-major."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    return _grid(images, cols)
