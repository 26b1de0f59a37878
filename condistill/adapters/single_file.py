"""Existing ControlNets published as one file, as a student's starting point (``pretrained_controlnet=FILE``).

Two layouts are read: the original ldm one (``control_model.input_blocks...``, or the same keys without the
prefix, as in ``control_v11p_sd15_canny.pth``), which diffusers' own converter
(``ControlNetModel.from_single_file``) turns into a ``ControlNetModel``; and diffusers' key layout in one
file (as SDXL ControlNets are often published). The architecture is the base UNet's
(``ControlNetModel.from_unet``) with the condition channels and embedding widths read from the file, so no
configuration is fetched from the hub.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

__all__ = ["SINGLE_FILE_SUFFIXES", "controlnet_from_single_file", "is_single_file"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
_LDM_PREFIX = "control_model."


def is_single_file(source) -> bool:
    """Whether ``source`` names one weights file (an existing file with a weights suffix)."""
    path = Path(os.fspath(source)).expanduser()
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return state


def _embedding(state: dict[str, torch.Tensor], path: Path) -> tuple[str, int, list[int]]:
    """(layout, condition channels, condition-embedding widths) of a ControlNet state dict."""
    if "controlnet_cond_embedding.conv_in.weight" in state:
        conv_in = state["controlnet_cond_embedding.conv_in.weight"]
        blocks = sorted((int(m.group(1)), t) for k, t in state.items()
                        if (m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight", k)))
        widths = [conv_in.shape[0]] + [t.shape[0] for i, t in blocks if i % 2 == 1]
        return "diffusers", conv_in.shape[1], widths
    convs = sorted((int(m.group(1)), t) for k, t in state.items()
                   if (m := re.fullmatch(r"(?:control_model\.)?input_hint_block\.(\d+)\.weight", k)))
    if len(convs) < 2:
        raise ValueError(f"{path} is no ControlNet: it has neither an input_hint_block (the original layout) nor a "
                         "controlnet_cond_embedding (diffusers' layout)")
    # the hint block: a conv to the first width, then (conv, conv to the next width) per stride, then conv_out
    widths = [convs[0][1].shape[0]] + [t.shape[0] for j, (_, t) in enumerate(convs[1:-1]) if j % 2 == 1]
    return "ldm", convs[0][1].shape[1], widths


def controlnet_from_single_file(path, unet):
    """A float32 ``ControlNetModel`` for ``unet``'s architecture with the weights of the file at ``path``.

    Raises:
        ValueError: the file is no ControlNet, or its tensors do not fit ``unet`` (the message says which).
    """
    from diffusers import ControlNetModel

    from condistill.adapters.student import unet_without_lora

    path = Path(os.fspath(path)).expanduser()
    state = _read(path)
    layout, channels, widths = _embedding(state, path)
    model = ControlNetModel.from_unet(unet_without_lora(unet), conditioning_channels=channels,
                                      conditioning_embedding_out_channels=tuple(widths))
    try:
        if layout == "diffusers":
            model.load_state_dict(state, strict=True)
        else:
            with tempfile.TemporaryDirectory() as config_dir:
                model.save_config(config_dir)
                model = ControlNetModel.from_single_file(str(path), config=config_dir, local_files_only=True,
                                                         torch_dtype=torch.float32)
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"the ControlNet file {path} does not fit this base ({layout} layout, condition channels "
                         f"{channels}, embedding widths {widths}): {first[:300]}") from error
    return model if next(model.parameters()).dtype == torch.float32 else model.float()
