"""T2I-Adapter student: a small trainable image encoder whose multi-scale features are added
inside the frozen UNet's down blocks (diffusers ``T2IAdapter``: ``full_adapter``,
``full_adapter_xl`` or ``light_adapter``).

Shape matching: the adapter's widths follow the UNet's ``block_out_channels``.
``full_adapter`` uses them all and ``light_adapter`` all but the last (it appends one extra
block at the last width, so it needs the last two UNet widths equal, as in SD 1.x/2.x); both
unshuffle by the VAE factor, so their first feature is at latent resolution.
``full_adapter_xl`` (SDXL's layout: a plain first down block, the last one without
downsampler) unshuffles by twice the VAE factor and repeats the last width, its fourth feature
going to the UNet's mid block. ``adapter_type="auto"`` takes the first of ``full_adapter``,
``full_adapter_xl`` that fits the UNet. diffusers' light adapter halves the resolution at every
block, so it cannot fit SDXL, whose first two residual slots share one resolution.

Zero initialisation (so step 0 leaves the teacher unchanged, exactly):

* ``light_adapter``: every block's ``out_conv`` (weight and bias) is zero, so every feature
  is zero; gradients reach ``out_conv`` through the non-zero hidden activations.
* ``full_adapter`` and ``full_adapter_xl``: ``conv_in``, the ``in_conv`` biases and the second
  convolution (``block2``) of every residual block are zero, so the body carries an all-zero signal;
  gradients reach ``conv_in`` through the residual identity paths and ``block2`` through the
  ``block1`` activations, so every parameter trains.

Exported as a stock ``T2IAdapter`` folder (``t2i_adapter/config.json`` +
``t2i_adapter/diffusion_pytorch_model.safetensors``) for ``StableDiffusionAdapterPipeline``
(``StableDiffusionXLAdapterPipeline`` on SDXL).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from condistill.adapters.student import (
    Student,
    base_family,
    check_pretrained_fit,
    pretrained_folder,
    register_adapter,
    save_module_folder,
    unet_residual_layout,
)

__all__ = [
    "T2IAdapterStudent",
    "T2IAdapterFeatures",
    "make_t2i_adapter",
    "zero_init_t2i_adapter",
    "t2i_adapter_fits",
    "resolve_adapter_type",
    "ADAPTER_TYPES",
    "AUTO_ADAPTER_TYPES",
]

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")
#: what ``adapter_type="auto"`` tries, in order
AUTO_ADAPTER_TYPES = ("full_adapter", "full_adapter_xl")
SUBFOLDER = "t2i_adapter"
#: the ``weight_components`` entry of the T2I-Adapter folder (``t2i_adapter`` and ``lora`` kinds)
WEIGHT_COMPONENT = {"t2i_adapter": f"{SUBFOLDER}/diffusion_pytorch_model.safetensors"}
_DEFAULT_RES_BLOCKS = {"full_adapter": 2, "full_adapter_xl": 2, "light_adapter": 4}
#: the adapter's pixel-unshuffle factor, in VAE factors
_UNSHUFFLE = {"full_adapter": 1, "full_adapter_xl": 2, "light_adapter": 1}


def _adapter_channels(unet, adapter_type: str) -> list[int]:
    widths = [int(c) for c in unet.config.block_out_channels]
    if adapter_type == "full_adapter_xl":
        return widths + widths[-1:]
    return widths if adapter_type == "full_adapter" else widths[:-1]


def _adapter_layout(adapter_type: str, channels) -> list[tuple[int, int]]:
    """``(channels, downscale vs. the adapter's unshuffled input)`` of each feature of a T2I-Adapter."""
    if adapter_type == "full_adapter_xl":  # one downsampling block, the third
        return [(c, 1 if i < 2 else 2) for i, c in enumerate(channels)]
    if adapter_type == "full_adapter":
        return [(c, 2**i) for i, c in enumerate(channels)]
    return [(c, 2**i) for i, c in enumerate(channels)] + [(channels[-1], 2 ** len(channels))]


def _slots(unet) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The UNet's down-block residual slots and its mid block's ``(channels, downscale)``."""
    down = unet_residual_layout(unet)
    return down, (int(unet.config.block_out_channels[-1]), down[-1][1] if down else 1)


def _layout_fits(have, unet) -> bool:
    # diffusers adds one more feature to the mid block when its shape matches (T2I-Adapter-XL)
    down, mid = _slots(unet)
    return have == down or have == down + [mid]


def resolve_adapter_type(unet, adapter_type: str, candidates=AUTO_ADAPTER_TYPES) -> str:
    """``adapter_type`` itself, or for ``"auto"`` the first of ``candidates`` that fits ``unet``."""
    if adapter_type != "auto":
        return adapter_type
    for candidate in candidates:
        if t2i_adapter_fits(unet, candidate)[0]:
            return candidate
    return "full_adapter"  # fits nothing: make_t2i_adapter explains why


def t2i_adapter_fits(unet, adapter_type: str) -> tuple[bool, str]:
    """Whether a T2I-Adapter of ``adapter_type`` built from the UNet's widths fits its residual slots.

    Returns ``(fits, explanation)``; the explanation lists both layouts when they differ.
    """
    if adapter_type not in ADAPTER_TYPES:
        return False, f"adapter_type must be one of {list(ADAPTER_TYPES)}, got {adapter_type!r}"
    channels = _adapter_channels(unet, adapter_type)
    if not channels:
        return False, "the light adapter needs a UNet with at least two down blocks"
    have = [(c, s * _UNSHUFFLE[adapter_type]) for c, s in _adapter_layout(adapter_type, channels)]
    if _layout_fits(have, unet):
        return True, ""
    down, mid = _slots(unet)
    return False, (
        f"the UNet takes residuals (channels, downscale) {down} (and {mid} at its mid block) but a "
        f"{adapter_type} built from block_out_channels {list(unet.config.block_out_channels)} gives {have}"
    )


@torch.no_grad()
def zero_init_t2i_adapter(adapter) -> None:
    """Zero the parameters that make every feature of a diffusers ``T2IAdapter`` exactly zero.

    See the module docstring for which parameters and why training still reaches all of them.
    """
    body = adapter.adapter
    kind = type(body).__name__
    if kind == "LightAdapter":
        for block in body.body:
            nn.init.zeros_(block.out_conv.weight)
            nn.init.zeros_(block.out_conv.bias)
    elif kind in ("FullAdapter", "FullAdapterXL"):
        nn.init.zeros_(body.conv_in.weight)
        nn.init.zeros_(body.conv_in.bias)
        for block in body.body:
            if block.in_conv is not None:
                nn.init.zeros_(block.in_conv.bias)
            for resnet in block.resnets:
                nn.init.zeros_(resnet.block2.weight)
                nn.init.zeros_(resnet.block2.bias)
    else:
        raise ValueError(f"Cannot zero-initialise a {kind}; use one of {list(ADAPTER_TYPES)}.")


def make_t2i_adapter(
    unet,
    condition_channels: int,
    vae_scale_factor: int,
    adapter_type: str = "auto",
    num_res_blocks: int | None = None,
    zero_init: bool = True,
):
    """A diffusers ``T2IAdapter`` whose features match ``unet``'s down-block residuals.

    Raises:
        ValueError: unknown ``adapter_type`` or a UNet whose layout the type cannot match.
    """
    from diffusers import T2IAdapter

    adapter_type = resolve_adapter_type(unet, adapter_type)
    fits, why = t2i_adapter_fits(unet, adapter_type)
    if not fits:
        others = [a for a in AUTO_ADAPTER_TYPES if a != adapter_type and t2i_adapter_fits(unet, a)[0]]
        hint = f" Use adapter_type={others[0]!r} (or 'auto') for this base." if others else ""
        raise ValueError(f"A T2I-Adapter cannot be attached to this UNet: {why}.{hint}")
    n_res = _DEFAULT_RES_BLOCKS[adapter_type] if num_res_blocks is None else int(num_res_blocks)
    if n_res < 1:
        raise ValueError(f"num_res_blocks must be at least 1, got {num_res_blocks}.")
    adapter = T2IAdapter(
        in_channels=condition_channels,
        channels=_adapter_channels(unet, adapter_type),
        num_res_blocks=n_res,
        downscale_factor=vae_scale_factor * _UNSHUFFLE[adapter_type],
        adapter_type=adapter_type,
    )
    if zero_init:
        zero_init_t2i_adapter(adapter)
    return adapter


def load_pretrained_t2i_adapter(source, unet, condition_channels: int, vae_scale_factor: int, revision=None):
    """Load a ``T2IAdapter`` folder / hub id, or one file in the original layout
    (:func:`~condistill.adapters.single_file.t2i_adapter_from_single_file`), and check it fits ``unet`` and the
    condition."""
    from diffusers import T2IAdapter

    from condistill.adapters.single_file import is_single_file, t2i_adapter_from_single_file

    if is_single_file(source):
        adapter = t2i_adapter_from_single_file(source, condition_channels, vae_scale_factor)
    else:
        folder = pretrained_folder(source, SUBFOLDER, revision=revision)
        adapter = T2IAdapter.from_pretrained(folder, torch_dtype=torch.float32)
    cfg = adapter.config
    problems = []
    if cfg.in_channels != condition_channels:
        problems.append(f"in_channels {cfg.in_channels} != condition channels {condition_channels}")
    if cfg.adapter_type not in ADAPTER_TYPES:
        problems.append(f"adapter_type {cfg.adapter_type!r} is not one of {list(ADAPTER_TYPES)}")
    else:
        want = vae_scale_factor * _UNSHUFFLE[cfg.adapter_type]
        if cfg.downscale_factor != want:
            problems.append(f"downscale_factor {cfg.downscale_factor} != {want} (the VAE factor {vae_scale_factor}"
                            f"{' x 2' if want != vae_scale_factor else ''})")
        elif not _layout_fits([(c, s * _UNSHUFFLE[cfg.adapter_type]) for c, s in
                               _adapter_layout(cfg.adapter_type, list(cfg.channels))], unet):
            problems.append(f"its channels {list(cfg.channels)} do not match the UNet's residual slots")
    check_pretrained_fit(problems, f"pretrained adapter {os.fspath(source)!r}", "an adapter")
    return adapter, cfg.adapter_type, int(cfg.num_res_blocks)


class T2IAdapterFeatures:
    """Shared T2I-Adapter parts of the ``t2i_adapter`` and ``lora`` students."""

    adapter: nn.Module

    def encode_condition(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """The adapter's feature list (one ``[B, C_i, h_i, w_i]`` tensor per UNet down block)."""
        self._check_condition(cond, self.vae_scale_factor)
        p = next(self.adapter.parameters())
        return list(self.adapter(cond.to(device=p.device, dtype=p.dtype)))

    def _unet_with_features(self, z, t, encoder_hidden_states, features):
        dtype = next(self.unet.parameters()).dtype
        # The UNet pops from this list, so hand it a fresh one each call (features are reused).
        residuals = [f.to(dtype) for f in features]
        return self.unet(
            z,
            t,
            **self.text_kwargs(encoder_hidden_states, z),
            down_intrablock_additional_residuals=residuals,
            return_dict=False,
        )[0]

    def _save_adapter_folder(self, out_dir) -> dict[str, str]:
        return {"t2i_adapter": save_module_folder(self.adapter, out_dir, SUBFOLDER)}

    def _file_modules(self):
        return {"t2i_adapter": self.adapter}

    @staticmethod
    def load_stock_adapter(adapter_dir, weight_files, dtype):
        """The exported diffusers ``T2IAdapter`` of an adapter folder (safetensors only)."""
        from diffusers import T2IAdapter

        from condistill.adapters.integrity import load_stock_module

        return load_stock_module(T2IAdapter, adapter_dir, weight_files["t2i_adapter"], dtype)

    @staticmethod
    def adapter_snippet(weight_files, family=None) -> list[str]:
        """The plain-diffusers lines that load the exported ``T2IAdapter`` as ``adapter``."""
        sub = Path(weight_files.get("t2i_adapter", f"{SUBFOLDER}/x")).parent.as_posix()
        return [
            f"from diffusers import {base_family(family).pipelines['adapter']}, T2IAdapter",
            "from condistill import CoDiScheduler",
            "",
            f'adapter = T2IAdapter.from_pretrained(ADAPTER, subfolder="{sub}")',
        ]

    @staticmethod
    def adapter_pipeline(components, adapter, family=None):
        """The family's T2I-Adapter pipeline (``StableDiffusionAdapterPipeline``, ``StableDiffusionXLAdapterPipeline``)
        on the shared ``components`` (given only those it takes)."""
        return base_family(family, components["unet"]).pipeline("adapter", components, adapter=adapter)


class T2IAdapterStudent(T2IAdapterFeatures, Student):
    """Frozen UNet + trainable diffusers ``T2IAdapter``.

    Options (keyword arguments of :func:`~condistill.adapters.build_student`):
        vae_scale_factor: pixels per latent pixel (SD: 8), the adapter's unshuffle factor;
            required unless built from a Base.
        adapter_type: ``"auto"`` (default: ``full_adapter`` for SD 1.x/2.x, ``full_adapter_xl`` for
            SDXL), ``"full_adapter"``, ``"full_adapter_xl"`` or ``"light_adapter"``.
        num_res_blocks: residual blocks per adapter block (default 2 full / 4 light).
        pretrained_adapter: a ``T2IAdapter`` folder / hub id (or condistill export), or one file in the
            original layout (:mod:`~condistill.adapters.single_file`), to start
            from; it is trained, not zero-initialised.
        revision: hub revision of ``pretrained_adapter``.
    """

    kind = "t2i_adapter"
    weight_components = dict(WEIGHT_COMPONENT)

    def __init__(
        self,
        unet,
        condition_channels: int,
        vae_scale_factor: int | None = None,
        adapter_type: str = "auto",
        num_res_blocks: int | None = None,
        pretrained_adapter: str | os.PathLike | None = None,
        revision: str | None = None,
    ):
        super().__init__(unet, condition_channels, vae_scale_factor)
        if pretrained_adapter is not None:
            adapter, adapter_type, num_res_blocks = load_pretrained_t2i_adapter(
                pretrained_adapter, unet, condition_channels, vae_scale_factor, revision
            )
            self.initialized_from = os.fspath(pretrained_adapter)
        else:
            adapter = make_t2i_adapter(unet, condition_channels, vae_scale_factor, adapter_type, num_res_blocks)
        self.adapter = self._trainable(adapter)
        self.adapter_options = {
            "condition_channels": condition_channels,
            "vae_scale_factor": vae_scale_factor,
            "adapter_type": adapter.config.adapter_type,
            "num_res_blocks": int(adapter.config.num_res_blocks),
        }

    def _adapter_modules(self):
        return {"adapter": self.adapter}

    def _forward_adapter(self, z, t, encoder_hidden_states, features):
        return self._unet_with_features(z, t, encoder_hidden_states, features)

    def save_weights(self, out_dir):
        """Save a stock ``T2IAdapter`` folder ``out_dir/t2i_adapter`` (safetensors)."""
        return self._save_adapter_folder(out_dir)

    @classmethod
    def diffusers_snippet(cls, base, weight_files, family=None):
        family = base_family(family)
        extra = ", safety_checker=None" if "safety_checker" in family.load_kwargs else ""
        return cls.adapter_snippet(weight_files, family) + [
            f'pipe = {family.pipelines["adapter"]}.from_pretrained("{base}", adapter=adapter{extra})']

    @classmethod
    def stock_pipeline(cls, adapter_dir, weight_files, components, dtype, family=None):
        """``StableDiffusionAdapterPipeline`` (``StableDiffusionXLAdapterPipeline`` on SDXL) with the exported
        ``T2IAdapter`` (``image=`` is the condition)."""
        return cls.adapter_pipeline(components, cls.load_stock_adapter(adapter_dir, weight_files, dtype), family)


register_adapter("t2i_adapter", T2IAdapterStudent)
