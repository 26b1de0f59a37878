"""Existing ControlNets and T2I-Adapters published as one file, as a student's starting point
(``pretrained_controlnet=FILE``, ``pretrained_adapter=FILE``).

Two layouts are read: the original ldm one (``control_model.input_blocks...``, or the same keys without the
prefix, as in ``control_v11p_sd15_canny.pth``), which diffusers' own converter
(``ControlNetModel.from_single_file``) turns into a ``ControlNetModel``; and diffusers' key layout in one
file (as SDXL ControlNets are often published). The architecture is the base UNet's
(``ControlNetModel.from_unet``) with the condition channels and embedding widths read from the file, so no
configuration is fetched from the hub. A T2I-Adapter file is read in the original (TencentARC) layout of the
A1111 and ComfyUI loaders (:mod:`condistill.publish.t2i_layout`), its settings read from its tensors.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

__all__ = ["SINGLE_FILE_SUFFIXES", "controlnet_from_single_file", "is_single_file", "t2i_adapter_from_single_file"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
_LDM_PREFIX = "control_model."


def is_single_file(source) -> bool:
    """Whether ``source`` names one weights file (an existing file with a weights suffix)."""
    path = Path(os.fspath(source)).expanduser()
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # tensors only: a pickled object is refused, never run
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as error:  # a damaged file, a pickle of other objects, a file of another format
        raise ValueError(f"{path} is not a readable weights file ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else ''})") from error
    if isinstance(state, dict):  # checkpoints often carry counters beside the tensors
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} or state
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


def _t2i_settings(state: dict[str, torch.Tensor], path: Path, channels: int, vae_scale_factor: int) -> dict:
    """The ``T2IAdapter`` settings of a state dict in the original (TencentARC) layout."""
    from condistill.publish.t2i_layout import FULL_RES_BLOCKS

    def indices(pattern: str) -> list[int]:
        return sorted({int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))})

    if "body.0.out_conv.weight" in state:  # light: one extractor per block, the last one repeating the width
        blocks = indices(r"body\.(\d+)\.out_conv\.weight")
        widths = [state[f"body.{b}.out_conv.weight"].shape[0] for b in blocks]
        per = len(indices(r"body\.0\.body\.(\d+)\.block1\.weight"))
        return dict(channels=widths[:-1], num_res_blocks=per, downscale_factor=vae_scale_factor,
                    adapter_type="light_adapter")
    if "conv_in.weight" not in state:
        raise ValueError(f"{path} is no T2I-Adapter in the original layout (no conv_in, no body.0.out_conv); pass "
                         "a diffusers T2IAdapter folder or hub id instead")
    per, width = FULL_RES_BLOCKS, state["conv_in.weight"].shape[0]
    widths = []
    for block in range(len(indices(r"body\.(\d+)\.block1\.weight")) // per):
        conv = state.get(f"body.{block * per}.in_conv.weight")
        width = conv.shape[0] if conv is not None else width
        widths.append(width)
    unshuffled = state["conv_in.weight"].shape[1]
    for adapter_type, factor in (("full_adapter", vae_scale_factor), ("full_adapter_xl", 2 * vae_scale_factor)):
        if unshuffled == channels * factor ** 2:
            return dict(channels=widths, num_res_blocks=per, downscale_factor=factor, adapter_type=adapter_type)
    raise ValueError(f"{path}: its conv_in reads {unshuffled} channels, which is neither {channels} condition "
                     f"channels at the VAE factor {vae_scale_factor} nor at twice it (SDXL's full adapter)")


def t2i_adapter_from_single_file(path, channels: int, vae_scale_factor: int):
    """A float32 ``T2IAdapter`` with the weights of a file in the original (TencentARC) key layout, as A1111 and
    ComfyUI load them and ``condistill export --format single-file`` writes them; ``channels`` and
    ``vae_scale_factor`` are the condition's and the base's (the layout does not record them)."""
    from diffusers import T2IAdapter

    from condistill.publish.t2i_layout import t2i_original_state_dict

    path = Path(os.fspath(path)).expanduser()
    state = _read(path)
    settings = _t2i_settings(state, path, channels, vae_scale_factor)
    adapter = T2IAdapter(in_channels=channels, **settings)
    ours = adapter.state_dict()
    config = dict(adapter.config)
    names = {key: next(iter(t2i_original_state_dict({key: tensor}, config))) for key, tensor in ours.items()}
    original = set(names.values())
    missing = sorted(original - set(state))
    extra = sorted(set(state) - original)
    if missing or extra:
        raise ValueError(f"the T2I-Adapter file {path} does not match a {settings['adapter_type']} with widths "
                         f"{settings['channels']}: missing {missing[:3]}, unexpected {extra[:3]}")
    try:
        adapter.load_state_dict({key: state[names[key]] for key in ours}, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(f"the T2I-Adapter file {path} does not fit {channels} condition channels and this base: "
                         f"{(lines[1] if len(lines) > 1 else lines[0])[:300]}") from error
    return adapter.float()
