"""ControlNet student: a trainable copy of the UNet encoder (diffusers ``ControlNetModel``).

Built with ``ControlNetModel.from_unet``: the encoder weights are copied from the teacher and
every output ("zero") convolution starts at zero, so at step 0 the student's output equals the
teacher's exactly. The condition image itself is the feature (the ControlNet embeds it at
every call, as the stock ``StableDiffusionControlNetPipeline`` does).

Exported as a stock ``ControlNetModel`` folder (``controlnet/config.json`` +
``controlnet/diffusion_pytorch_model.safetensors``); on SDXL the copy keeps the UNet's
``text_time`` embedding, as the SDXL ControlNets diffusers loads.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from condistill.adapters.student import (Student, base_family, check_pretrained_fit, pretrained_folder,
                                         register_adapter, save_module_folder, unet_without_lora)

__all__ = ["ControlNetStudent", "default_conditioning_embedding_channels"]

#: diffusers' default conditioning-embedding widths (4 entries = 3 stride-2 convs = factor 8).
_DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)
SUBFOLDER = "controlnet"


def default_conditioning_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Conditioning-embedding widths whose downsampling equals ``vae_scale_factor``.

    The ControlNet embeds the image-resolution condition with ``len(channels) - 1`` stride-2
    convolutions; SD's factor 8 gives diffusers' default ``(16, 32, 96, 256)``, factor 4 gives
    ``(16, 32, 96)`` and so on (wider factors repeat the last width).
    """
    n = int(math.log2(vae_scale_factor)) + 1
    channels = list(_DEFAULT_EMBEDDING_CHANNELS[:n])
    while len(channels) < n:
        channels.append(_DEFAULT_EMBEDDING_CHANNELS[-1])
    return tuple(channels)


class ControlNetStudent(Student):
    """Frozen UNet + trainable diffusers ``ControlNetModel``.

    Options (keyword arguments of :func:`~condistill.adapters.build_student`):
        vae_scale_factor: pixels per latent pixel (SD: 8); required unless built from a Base.
        conditioning_embedding_out_channels: widths of the condition embedding; default
            :func:`default_conditioning_embedding_channels` of the VAE factor.
        pretrained_controlnet: a ControlNet folder / hub id (or a condistill export), or one
            weights file (:mod:`~condistill.adapters.single_file`), to start from instead of the UNet copy. Its weights are trained (all parameters get
            ``requires_grad=True``); its architecture must match the base and the condition.
        revision: hub revision of ``pretrained_controlnet``.
    """

    kind = "controlnet"
    weight_components = {"controlnet": f"{SUBFOLDER}/diffusion_pytorch_model.safetensors"}
    has_img2img = True

    def __init__(
        self,
        unet,
        condition_channels: int,
        vae_scale_factor: int | None = None,
        conditioning_embedding_out_channels: Sequence[int] | None = None,
        pretrained_controlnet: str | os.PathLike | None = None,
        revision: str | None = None,
    ):
        super().__init__(unet, condition_channels, vae_scale_factor)
        from diffusers import ControlNetModel

        if pretrained_controlnet is not None:
            from condistill.adapters.single_file import controlnet_from_single_file, is_single_file

            if is_single_file(pretrained_controlnet):
                controlnet = controlnet_from_single_file(pretrained_controlnet, unet)
            else:
                folder = pretrained_folder(pretrained_controlnet, SUBFOLDER, revision=revision)
                controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32)
            self._check_pretrained(controlnet, pretrained_controlnet)
            embedding = tuple(controlnet.config.conditioning_embedding_out_channels)
            self.initialized_from = os.fspath(pretrained_controlnet)
        else:
            embedding = tuple(
                conditioning_embedding_out_channels or default_conditioning_embedding_channels(vae_scale_factor)
            )
            if 2 ** (len(embedding) - 1) != vae_scale_factor:
                raise ValueError(
                    f"conditioning_embedding_out_channels={list(embedding)} downsamples by "
                    f"{2 ** (len(embedding) - 1)} but the VAE factor is {vae_scale_factor}; give "
                    f"{int(math.log2(vae_scale_factor)) + 1} widths."
                )
            controlnet = ControlNetModel.from_unet(  # a LoRA another student keeps in the UNet is not copied
                unet_without_lora(unet), conditioning_channels=condition_channels,
                conditioning_embedding_out_channels=embedding,
            )
            if next(controlnet.parameters()).dtype != torch.float32:
                controlnet.to(torch.float32)
        self.controlnet = self._trainable(controlnet)
        self.adapter_options = {
            "condition_channels": condition_channels,
            "vae_scale_factor": vae_scale_factor,
            "conditioning_embedding_out_channels": list(embedding),
        }

    def _check_pretrained(self, controlnet, source) -> None:
        problems = []
        if controlnet.config.conditioning_channels != self.condition_channels:
            problems.append(
                f"conditioning_channels {controlnet.config.conditioning_channels} != condition channels "
                f"{self.condition_channels}"
            )
        for key in ("in_channels", "block_out_channels", "cross_attention_dim"):
            theirs, ours = controlnet.config[key], self.unet.config[key]
            if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != (
                list(ours) if isinstance(ours, (list, tuple)) else ours
            ):
                problems.append(f"{key} {theirs} != base {ours}")
        factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
        if factor != self.vae_scale_factor:
            problems.append(f"its condition embedding downsamples by {factor}, the VAE by {self.vae_scale_factor}")
        check_pretrained_fit(problems, f"pretrained_controlnet={os.fspath(source)!r}", "a ControlNet")

    def _adapter_modules(self):
        return {"controlnet": self.controlnet}

    def encode_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The condition itself (``[B, C, H, W]`` in ``[0, 1]``), cast to the ControlNet's dtype."""
        self._check_condition(cond, self.vae_scale_factor)
        p = next(self.controlnet.parameters())
        return cond.to(device=p.device, dtype=p.dtype)

    def shared_frozen_blocks(self):
        """The UNet's down blocks and mid block: a ControlNet's residuals join only after them."""
        return [*self.unet.down_blocks, *([self.unet.mid_block] if self.unet.mid_block is not None else [])]

    def _forward_adapter(self, z, t, encoder_hidden_states, features):
        cn_dtype = next(self.controlnet.parameters()).dtype
        down, mid = self.controlnet(
            z.to(cn_dtype),
            t,
            **self.text_kwargs(encoder_hidden_states, z, cn_dtype),
            controlnet_cond=features,
            conditioning_scale=1.0,
            return_dict=False,
        )
        unet_dtype = next(self.unet.parameters()).dtype
        return self.unet(
            z,
            t,
            **self.text_kwargs(encoder_hidden_states, z),
            down_block_additional_residuals=[r.to(unet_dtype) for r in down],
            mid_block_additional_residual=mid.to(unet_dtype),
            return_dict=False,
        )[0]

    def save_weights(self, out_dir):
        """Save a stock ``ControlNetModel`` folder ``out_dir/controlnet`` (safetensors)."""
        return {"controlnet": save_module_folder(self.controlnet, out_dir, SUBFOLDER)}

    def _file_modules(self):
        return {"controlnet": self.controlnet}

    @classmethod
    def diffusers_snippet(cls, base, weight_files, family=None):
        pipeline = base_family(family).pipelines["controlnet"]
        sub = Path(weight_files.get("controlnet", f"{SUBFOLDER}/x")).parent.as_posix()
        head = f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet'
        tail = [f"{head},", " " * 57 + "safety_checker=None)"]  # pipelines with a safety checker
        return [
            f"from diffusers import ControlNetModel, {pipeline}",
            "from condistill import CoDiScheduler",
            "",
            f'controlnet = ControlNetModel.from_pretrained(ADAPTER, subfolder="{sub}")',
            *(tail if "safety_checker" in base_family(family).load_kwargs else [f"{head})"]),
        ]

    @classmethod
    def stock_pipeline(cls, adapter_dir, weight_files, components, dtype, family=None):
        """``StableDiffusionControlNetPipeline`` (``StableDiffusionXLControlNetPipeline`` on SDXL) with the
        exported ``ControlNetModel`` (``image=`` is the condition)."""
        from diffusers import ControlNetModel

        from condistill.adapters.integrity import load_stock_module

        controlnet = load_stock_module(ControlNetModel, adapter_dir, weight_files["controlnet"], dtype)
        return base_family(family, components["unet"]).pipeline("controlnet", components, controlnet=controlnet)


register_adapter("controlnet", ControlNetStudent)
