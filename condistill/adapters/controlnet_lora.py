"""ControlNet + LoRA student: a trainable ControlNet and a small trainable LoRA on the frozen UNet, together.

A ControlNet only adds residuals to the frozen UNet's skip connections and middle; what the UNet
does with them stays the teacher's. A one-step student has to turn noise into an image in one call,
which may need the UNet itself to change a little: this kind trains a LoRA of the UNet
(:class:`~condistill.adapters.lora.UNetLoRA`, attention projections by default) beside the ControlNet,
both in one optimizer, and distils them as one student.

Exported as the ControlNet folder (``controlnet/``) plus ``pytorch_lora_weights.safetensors``; the
stock pipeline is the ControlNet pipeline with the LoRA loaded into its UNet (``load_lora_weights``,
adapter name ``"condistill"``, not fused).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from condistill.adapters.controlnet import ControlNetStudent
from condistill.adapters.lora import LORA_WEIGHT_NAME, UNetLoRA
from condistill.adapters.student import register_adapter

__all__ = ["ControlNetLoRAStudent"]


class ControlNetLoRAStudent(UNetLoRA, ControlNetStudent):
    """Frozen UNet + trainable ``ControlNetModel`` + trainable LoRA layers in the UNet.

    Options (keyword arguments of :func:`~condistill.adapters.build_student`): those of
    :class:`~condistill.adapters.controlnet.ControlNetStudent` and the LoRA's ``rank`` (default 4),
    ``lora_alpha`` (default = rank) and ``targets`` (``"attention"`` by default, as
    :class:`~condistill.adapters.lora.LoRAStudent`).
    """

    kind = "controlnet_lora"
    weight_components = {**ControlNetStudent.weight_components, "lora": LORA_WEIGHT_NAME}

    def __init__(self, unet, condition_channels: int, vae_scale_factor: int | None = None, rank: int = 4,
                 lora_alpha: float | None = None, targets: str | Sequence[str] = "attention",
                 conditioning_embedding_out_channels: Sequence[int] | None = None,
                 pretrained_controlnet: str | os.PathLike | None = None, revision: str | None = None):
        others_flags = self._other_lora_flags(unet)
        # the ControlNet is copied from the UNet before the LoRA is added: it holds no LoRA layers
        super().__init__(unet, condition_channels, vae_scale_factor,
                         conditioning_embedding_out_channels=conditioning_embedding_out_channels,
                         pretrained_controlnet=pretrained_controlnet, revision=revision)
        self.adapter_options.update(self._init_lora(unet, rank, lora_alpha, targets, others_flags))

    def shared_frozen_blocks(self):
        """None: the LoRA changes what the UNet's down blocks compute, online and in the EMA branches."""
        return []

    def trainable_named_parameters(self):
        """The ControlNet's parameters (``controlnet.*``) and the LoRA's (``unet.*lora_A/B.condistill*``)."""
        out = super().trainable_named_parameters()
        out.update(self._lora_parameters())
        return out

    def _forward_adapter(self, z, t, encoder_hidden_states, features):
        with self._lora_switched(True):
            return super()._forward_adapter(z, t, encoder_hidden_states, features)

    # ---- files ------------------------------------------------------------------------
    def save_weights(self, out_dir):
        """Save the ``controlnet/`` folder and ``pytorch_lora_weights.safetensors``."""
        files = super().save_weights(out_dir)
        files.update(self._save_lora(out_dir))
        return files

    @classmethod
    def diffusers_snippet(cls, base, weight_files, family=None):
        lora = Path(weight_files.get("lora", LORA_WEIGHT_NAME)).as_posix()
        return [*super().diffusers_snippet(base, weight_files, family),
                f'pipe.load_lora_weights(ADAPTER, weight_name="{lora}")']

    @classmethod
    def stock_pipeline(cls, adapter_dir, weight_files, components, dtype, family=None):
        """The family's ControlNet pipeline (``image=`` is the condition) whose UNet carries the LoRA."""
        pipe = super().stock_pipeline(adapter_dir, weight_files, components, dtype, family)
        cls._load_lora_into(pipe, adapter_dir, weight_files["lora"])
        return pipe


register_adapter("controlnet_lora", ControlNetLoRAStudent)
