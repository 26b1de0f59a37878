"""No condition: images only, for a condition-free student of the base (an LCM-LoRA, the ``lcm_lora`` adapter).

The tensor is a single channel of zeros that the condition-free student never reads; it exists so that the
data pipeline, evaluation and export treat this student like every other. Its recipe distils the base's
guided sampling into a LoRA of the UNet by consistency alone, as LCM-LoRA does: the frozen teacher with
classifier-free guidance (``w`` drawn per sample from ``guidance_min..guidance_max``) solves each ODE step,
the EMA student gives the target, no regression term, and the student samples without guidance.
"""
from __future__ import annotations

import torch

from condistill.conditions.condition import Condition, register_condition
from condistill.data.record import Record
from condistill.presets import CPU

__all__ = ["NoCondition", "LCM_GUIDANCE"]

#: the CFG range folded into the LCM-LoRA of the embedded teacher: around the CFG 4 its results use, as the
#: LCM-LoRA papers' w in [2, 14] is around SD's usual 7.5
LCM_GUIDANCE = (2.0, 6.0)


class NoCondition(Condition):
    """No condition: a ``float32 [1, H, W]`` tensor of zeros (the ``lcm_lora`` student ignores it)."""

    name = "none"
    channels = 1
    description = "text-to-image: no condition; distils the base into a few-step LoRA (an LCM-LoRA, --adapter lcm_lora)."
    presets = {
        "cpu-demo": dict(_help="an LCM-LoRA of the embedded teacher on CPU (1,000 steps)", output_dir="runs/lcm-lora",
                         adapter="lcm_lora", max_steps=1000, validate_every=500, regression_weight=0.0,
                         ode_source="teacher", guidance_min=LCM_GUIDANCE[0], guidance_max=LCM_GUIDANCE[1],
                         guidance_branches="ode", **CPU),
    }

    def __init__(self):
        pass

    def card_text(self) -> tuple[str, str]:
        return "text-to-image", "nothing (the adapter takes no condition)"

    def compute(self, record: Record, seed: int) -> torch.Tensor:
        width, height = record.image.size
        return torch.zeros(1, height, width)


register_condition(NoCondition)
