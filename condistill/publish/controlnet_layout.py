"""ControlNets in the original (CompVis/ldm ``cldm``) single-file key layout of the A1111/ComfyUI ControlNet
loaders and of diffusers' ``ControlNetModel.from_single_file``: ``control_model.time_embed``, ``.input_blocks``,
``.zero_convs``, ``.input_hint_block``, ``.middle_block``, ``.middle_block_out``. The tensors are renamed, not
changed.
"""
from __future__ import annotations

import re

import torch

__all__ = ["controlnet_ldm_state_dict", "LDM_CONTROLNET_PREFIX", "SD_HINT_BLOCK_WIDTHS", "SD_HINT_WIDTHS"]

LDM_CONTROLNET_PREFIX = "control_model."
#: the ldm hint block of SD ControlNets: 8 convolutions, conv_out at index 14
SD_HINT_BLOCK_WIDTHS = 4
#: its widths (``conditioning_embedding_out_channels``), which the webui loaders build as they are
SD_HINT_WIDTHS = [16, 32, 96, 256]


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise KeyError(rest)
    return f"{_RESNET[head]}.{tail}"


def _ldm_key(key: str, layers_per_block: int, hint_blocks: int) -> str:
    per = layers_per_block + 1  # ldm input blocks per diffusers down block (resnets+attention, then downsampler)
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * hint_blocks + 2}",
             "controlnet_mid_block": "middle_block_out.0"}
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    patterns = [
        (r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", lambda k, rest: f"input_hint_block.{2 * int(k) + 2}.{rest}"),
        (r"controlnet_down_blocks\.(\d+)\.(.+)", lambda i, rest: f"zero_convs.{i}.0.{rest}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda b, j, rest: f"input_blocks.{1 + int(b) * per + int(j)}.0.{_resnet(rest)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, j, rest: f"input_blocks.{1 + int(b) * per + int(j)}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda b, rest: f"input_blocks.{1 + int(b) * per + layers_per_block}.0.op.{rest}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda j, rest: f"middle_block.{2 * int(j)}.{_resnet(rest)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
    ]
    for pattern, build in patterns:
        match = re.fullmatch(pattern, key)
        if match:
            return build(*match.groups())
    raise KeyError(key)


def controlnet_ldm_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``ControlNetModel`` state dict (and its config) -> ``control_model.*`` ldm keys."""
    unsupported = {k: config.get(k) for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim")
                   if config.get(k) is not None}
    if unsupported or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        found = unsupported or {"mid_block_type": config.get("mid_block_type")}
        raise ValueError(f"only SD 1.x/2.x-style ControlNets have this single-file layout; this one has {found}.")
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block={lpb!r}: only one value for every block is supported.")
    hint_blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        try:
            ldm = LDM_CONTROLNET_PREFIX + _ldm_key(key, lpb, hint_blocks)
        except KeyError:
            unknown.append(key)
            continue
        if ldm in out:
            raise ValueError(f"two ControlNet tensors map to {ldm}")
        out[ldm] = tensor.contiguous()
    if unknown:
        raise ValueError(f"{len(unknown)} ControlNet tensor(s) have no place in the ldm layout: {unknown[:5]}")
    return out
