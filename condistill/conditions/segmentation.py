"""Segmentation condition: a colour-coded map of which kind of object covers each pixel.

Built from what the synthetic scenes know exactly: their per-object visible-region masks
(``Record.masks``) and each object's shape (``attributes["objects"][j]["shape"]``). Every
pixel gets the colour of its class in :data:`PALETTE` (black where no object is), the form
segmentation ControlNets take. A dataset that ships its own segmentation images in that
palette (a ``conditioning_image`` column) is read as it is.

The fidelity metric is the mean intersection-over-union between the input map and the
judge's segmentation of the generated image (:meth:`condistill.world.judge.Judge.segment`).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from condistill.conditions.condition import Condition, FidelityUnavailable, register_condition
from condistill.data.record import Record
from condistill.presets import CPU

__all__ = ["CLASSES", "PALETTE", "SegmentationCondition", "class_map", "mean_iou"]

#: the classes of the map, in index order: no object, then the scenes' shapes
CLASSES: tuple[str, ...] = ("none", "circle", "square", "triangle", "diamond")
#: their colours (RGB); far apart, so a resized or JPEG-compressed map still decodes to the right class
PALETTE: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25))


def class_map(control: torch.Tensor) -> torch.Tensor:
    """The class index ``int64 [..., H, W]`` of each pixel of segmentation maps ``float [..., 3, H, W]`` in
    ``[0, 1]``: the nearest palette colour."""
    palette = torch.tensor(PALETTE, dtype=torch.float32, device=control.device) / 255.0
    pixels = control.float().movedim(-3, -1)
    distance = ((pixels[..., None, :] - palette) ** 2).sum(-1)
    return distance.argmin(-1)


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = len(CLASSES)) -> float:
    """Mean intersection-over-union of class maps ``int [N, H, W]``, each class's intersections and unions summed
    over all images first; classes absent from both are left out of the mean."""
    if pred.shape != target.shape:
        raise ValueError(f"class maps differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    ious = []
    for k in range(num_classes):
        p, t = pred == k, target == k
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    return float(np.mean(ious)) if ious else float("nan")


class SegmentationCondition(Condition):
    """Object classes as a colour-coded ``float32 [3, H, W]`` map in ``[0, 1]`` (:data:`PALETTE`).

    Needs records that carry object masks and their shapes (the synthetic scenes), or a
    dataset-provided segmentation image in the palette (``Record.conditioning``), which wins
    when present. For photos with segmentation maps of another palette, train the ``paired``
    condition instead.
    """

    name = "segmentation"
    channels = 3
    description = ("segmentation-to-image: the condition is a colour-coded map of which kind of object covers "
                   "each pixel (the scenes' exact object masks).")
    presets = {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (700 steps, like edge)",
                         output_dir="runs/segmentation", max_steps=700, validate_every=350, **CPU),
    }
    fidelity = ("segmentation_miou", "higher")
    record_conditioning = "optional"  # a dataset's own maps (a conditioning_image column) are read when present

    @classmethod
    def teacher_bar(cls, s, t):
        return (f"mIoU >= 2 x teacher ({2 * t['segmentation_miou']:.3f})",
                s["segmentation_miou"] >= 2 * t["segmentation_miou"])

    def __init__(self):
        pass

    def card_text(self) -> tuple[str, str]:
        return "segmentation-to-image", "your segmentation map, coloured with condistill.conditions.segmentation.PALETTE"

    def control_image(self, image, seed: int = 0, multiple: int = 8, resolution: int | None = None, **record_fields):
        """:meth:`Condition.control_image` of a segmentation map: the given image is the map (in :data:`PALETTE`),
        unless object masks are given with it."""
        if "masks" not in record_fields:
            record_fields.setdefault("conditioning", image)
        return super().control_image(image, seed, multiple, resolution, **record_fields)

    def fidelity_scores(self, images, data, judge):
        """Mean IoU of the judge's segmentation of the images against the input maps (the judge's own floor on
        real scenes is in docs/judge.md)."""
        if judge is None:
            raise FidelityUnavailable("skipped: segmenting generated images needs the judge of the embedded scenes")
        target = class_map(data["conditioning"])
        pred = judge.segment(images, CLASSES)
        return {"segmentation_miou": mean_iou(pred, target)}

    def compute(self, record: Record, seed: int) -> torch.Tensor:
        """The record's map; ``seed`` is unused (the map is deterministic)."""
        if record.conditioning is not None:
            given = record.conditioning.convert("RGB")
            if given.size != record.image.size:
                given = given.resize(record.image.size, Image.NEAREST)
            array = np.asarray(given)
            classes = class_map(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0).numpy()
        else:
            classes = self.classes_of(record)
        coloured = np.asarray(PALETTE, dtype=np.uint8)[classes]
        return torch.from_numpy(coloured).permute(2, 0, 1).float().div_(255.0)

    @staticmethod
    def classes_of(record: Record) -> np.ndarray:
        """The class index ``int64 [H, W]`` of each pixel of a record with object masks and shapes."""
        objects = record.attributes.get("objects") if isinstance(record.attributes, dict) else None
        if record.masks is None or not objects:
            raise ValueError(
                f"record {record.key!r} has no object masks with shapes: the segmentation condition is made from "
                "the synthetic scenes' masks or from a segmentation image per item (a conditioning_image column); "
                "for your own control images train `condistill train paired`")
        masks = np.asarray(record.masks, dtype=bool)
        width, height = record.image.size
        if masks.ndim != 3 or masks.shape[1:] != (height, width) or len(masks) != len(objects):
            raise ValueError(f"record {record.key!r}: masks of shape {masks.shape} do not match its "
                             f"{len(objects)} objects and its {width}x{height} image")
        classes = np.zeros((height, width), dtype=np.int64)
        for mask, obj in zip(masks, objects):
            shape = obj.get("shape") if isinstance(obj, dict) else None
            if shape not in CLASSES[1:]:
                raise ValueError(f"record {record.key!r}: object shape {shape!r} is not one of {CLASSES[1:]}")
            classes[mask] = CLASSES.index(shape)
        return classes


register_condition(SegmentationCondition)
