"""T2I-Adapters in the original (TencentARC) key layout, the one A1111's and ComfyUI's adapter loaders read.

diffusers stores a ``T2IAdapter`` as ``adapter.body.{block}.resnets.{k}.*``; the original layout has no
``adapter.`` prefix and numbers the residual blocks differently:

* full adapters (``full_adapter``, ``full_adapter_xl``): one flat list, ``body.{block * R + k}.block1/2``,
  where R is the residual blocks per adapter block; a block's ``in_conv`` (present where the width
  changes) belongs to its first residual block, ``body.{block * R}.in_conv``; ``conv_in`` keeps its name.
* the light adapter: one extractor per block, ``body.{block}.in_conv``, ``body.{block}.body.{k}.block1/2``,
  ``body.{block}.out_conv``.

The tensors are renamed, not changed (a dtype may be chosen at export).

Those loaders rebuild the network from fixed settings, not from a config, so a file in this layout loads
only where our adapter has the shape they assume; :func:`loader_problem` says what does not fit (checked
against ComfyUI's loader by the fixtures of ``tools/comfyui_fixtures.py``):

* the VAE factor is 8 (SD 1.x/2.x, SDXL): the control image enters at eight times the latent size;
* a light adapter has widths ``[320, 640, 1280]`` (SD 1.x/2.x) and 4 residual blocks per block;
* a full adapter has 2 residual blocks per block and widths ``[c, 2c, 4c, 4c]``;
* the loaders tell an SDXL adapter from an SD one by ``conv_in``'s input channels (``64 * C`` for SD,
  ``256 * C`` for SDXL), which only works for 1- or 3-channel conditions.
"""
from __future__ import annotations

import re

import torch

__all__ = ["t2i_original_state_dict", "loader_problem", "LIGHT_WIDTHS", "LIGHT_RES_BLOCKS", "FULL_RES_BLOCKS"]

#: the light adapter the webui loaders build (their widths include the extra last block)
LIGHT_WIDTHS = [320, 640, 1280]
LIGHT_RES_BLOCKS = 4
FULL_RES_BLOCKS = 2

_RESNET = re.compile(r"body\.(\d+)\.resnets\.(\d+)\.(.+)")
_IN_CONV = re.compile(r"body\.(\d+)\.(in_conv|out_conv)\.(.+)")


def t2i_original_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``T2IAdapter`` state dict and its ``config.json`` -> the original key layout.

    Raises:
        ValueError: an adapter type this layout does not have, or a key with no place in it.
    """
    adapter_type = config.get("adapter_type")
    if adapter_type not in ("full_adapter", "full_adapter_xl", "light_adapter"):
        raise ValueError(f"adapter_type {adapter_type!r} has no original single-file layout.")
    per = int(config.get("num_res_blocks", FULL_RES_BLOCKS))
    light = adapter_type == "light_adapter"
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix("adapter.")
        resnet, conv = _RESNET.fullmatch(name), _IN_CONV.fullmatch(name)
        if resnet:
            block, k, rest = int(resnet[1]), int(resnet[2]), resnet[3]
            new = f"body.{block}.body.{k}.{rest}" if light else f"body.{block * per + k}.{rest}"
        elif conv and (light or conv[2] == "in_conv"):
            block = int(conv[1])
            new = f"body.{block}.{conv[2]}.{conv[3]}" if light else f"body.{block * per}.in_conv.{conv[3]}"
        elif not light and name.startswith("conv_in."):
            new = name
        else:
            raise ValueError(f"T2I-Adapter tensor {key!r} has no place in the original {adapter_type} layout.")
        if new in out:
            raise ValueError(f"two T2I-Adapter tensors map to {new}")
        out[new] = tensor.contiguous()
    return out


def loader_problem(config: dict) -> str | None:
    """Why A1111's and ComfyUI's adapter loaders would not rebuild this adapter (``None``: they do).

    ``config`` is the adapter's diffusers ``config.json``; its ``downscale_factor`` is the base's VAE factor
    (twice that for ``full_adapter_xl``, which halves the resolution once more at its input).
    """
    adapter_type, per = config.get("adapter_type"), int(config.get("num_res_blocks", 0))
    widths, cin = [int(c) for c in config.get("channels", [])], int(config.get("in_channels", 0))
    vae_scale_factor = int(config.get("downscale_factor", 8)) // (2 if adapter_type == "full_adapter_xl" else 1)
    if vae_scale_factor != 8:
        return (f"its base's VAE factor is {vae_scale_factor}; those loaders feed the control image at 8 times the "
                "latent size (SD 1.x/2.x, SDXL)")
    if cin not in (1, 3):
        return (f"its condition has {cin} channels; those loaders tell SD from SDXL adapters by the input width and "
                "read 1- or 3-channel conditions only")
    if adapter_type == "light_adapter":
        if widths != LIGHT_WIDTHS or per != LIGHT_RES_BLOCKS:
            return (f"a light adapter with widths {widths} and {per} residual blocks; those loaders build the SD "
                    f"1.x/2.x one only (widths {LIGHT_WIDTHS}, {LIGHT_RES_BLOCKS} residual blocks)")
        return None
    if per != FULL_RES_BLOCKS:
        return f"a full adapter with {per} residual blocks; those loaders build {FULL_RES_BLOCKS}"
    expected = [widths[0], 2 * widths[0], 4 * widths[0], 4 * widths[0]] if widths else []
    if widths != expected:
        return f"a full adapter with widths {widths}; those loaders build [c, 2c, 4c, 4c] ({expected})"
    return None
