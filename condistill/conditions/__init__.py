"""Conditions: how the control tensor ``c`` is made from a record.

Built in: ``edge``, ``depth``, ``sr``, ``inpaint``, ``segmentation``, ``paired`` for any control type the
data brings, and ``none`` (images only, for the condition-free ``lcm_lora`` student); each module registers its
class with one ``register_condition`` call when imported below.

Example::

    from condistill.conditions import get_condition
    edge = get_condition("edge", low_threshold=50, high_threshold=100)
    c = edge(record, seed=0)            # float32 [3, H, W] in [0, 1]
    edge.save_png(c, "edge.png")
    same = condition_from_config(edge.config())
"""
from condistill.conditions.condition import (
    Condition,
    available_conditions,
    condition_class,
    condition_from_config,
    get_condition,
    register_condition,
)
from condistill.conditions.depth import DepthCondition, EstimatorWeightsError
from condistill.conditions.edge import EdgeCondition, canny_edges
from condistill.conditions.inpaint import InpaintCondition
from condistill.conditions.none import NoCondition
from condistill.conditions.paired import PairedCondition
from condistill.conditions.segmentation import SegmentationCondition
from condistill.conditions.sr import SRCondition, bicubic_upscale

__all__ = [
    "Condition",
    "DepthCondition",
    "EdgeCondition",
    "EstimatorWeightsError",
    "InpaintCondition",
    "NoCondition",
    "PairedCondition",
    "SRCondition",
    "SegmentationCondition",
    "available_conditions",
    "bicubic_upscale",
    "canny_edges",
    "condition_class",
    "condition_from_config",
    "get_condition",
    "register_condition",
]
