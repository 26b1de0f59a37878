"""LCM-LoRA student: a LoRA of the frozen UNet and nothing else, for few-step sampling without a condition.

It is what practitioners load next to a conventional ControlNet or T2I-Adapter to sample it in a few steps
(the two-stage route: distil first, then add the condition). Trained on the ``none`` condition
(:mod:`condistill.conditions.none`), whose recipe distils the guided teacher by consistency alone.

Exported as ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format, the file
``pipe.load_lora_weights`` and ``condistill eval --lcm-lora`` read; the stock pipeline is the family's
text-to-image pipeline with the LoRA loaded (adapter name ``"condistill"``, not fused).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from condistill.adapters.lora import LORA_WEIGHT_NAME, UNetLoRA
from condistill.adapters.student import Student, base_family, register_adapter

__all__ = ["LCMLoRAStudent"]


class LCMLoRAStudent(UNetLoRA, Student):
    """Frozen UNet + trainable LoRA layers; the condition is ignored (train it on the ``none`` condition).

    Options (keyword arguments of :func:`~condistill.adapters.build_student`): ``rank`` (default 8),
    ``lora_alpha`` (default = rank) and ``targets`` (default ``"all"``: attention, feed-forward and ResNet
    convolutions, as LCM-LoRA adapts the whole UNet).
    """

    kind = "lcm_lora"
    weight_components = {"lora": LORA_WEIGHT_NAME}
    takes_condition = False

    def __init__(self, unet, condition_channels: int, vae_scale_factor: int | None = None, rank: int = 8,
                 lora_alpha: float | None = None, targets: str | Sequence[str] = "all"):
        others_flags = self._other_lora_flags(unet)
        super().__init__(unet, condition_channels, vae_scale_factor)
        self.adapter_options = {"condition_channels": condition_channels, "vae_scale_factor": vae_scale_factor,
                                **self._init_lora(unet, rank, lora_alpha, targets, others_flags)}

    def _adapter_modules(self):
        return {}

    def trainable_named_parameters(self):
        """The LoRA's parameters (``unet.*lora_A/B.condistill*``)."""
        return self._lora_parameters()

    def shared_frozen_blocks(self):
        """None: the LoRA changes what every UNet block computes."""
        return []

    def encode_condition(self, cond):
        """Nothing: the student takes no condition (an empty tuple, so that callers can pass it on)."""
        return ()

    def _forward_adapter(self, z, t, encoder_hidden_states, features):
        with self._lora_switched(True):
            return self._forward_unet(z, t, encoder_hidden_states)

    def _forward_unet(self, z, t, encoder_hidden_states):
        return self.unet(z, t, **self.text_kwargs(encoder_hidden_states, z), return_dict=False)[0]

    # ---- files ------------------------------------------------------------------------
    def save_weights(self, out_dir):
        """Save ``pytorch_lora_weights.safetensors``."""
        return self._save_lora(out_dir)

    @classmethod
    def diffusers_snippet(cls, base, weight_files, family=None):
        family = base_family(family)
        lora = Path(weight_files.get("lora", LORA_WEIGHT_NAME)).as_posix()
        pipeline = family.pipelines["text"]
        safety = ", safety_checker=None" if "safety_checker" in family.load_kwargs else ""
        return [f"from diffusers import {pipeline}", "from condistill import CoDiScheduler", "",
                f'pipe = {pipeline}.from_pretrained("{base}"{safety})',
                f'pipe.load_lora_weights(ADAPTER, weight_name="{lora}")']

    @classmethod
    def stock_pipeline(cls, adapter_dir, weight_files, components, dtype, family=None):
        """The family's text-to-image pipeline whose UNet carries the LoRA."""
        pipe = base_family(family, components["unet"]).pipeline("text", components)
        cls._load_lora_into(pipe, adapter_dir, weight_files["lora"])
        return pipe


register_adapter("lcm_lora", LCMLoRAStudent)
