"""The conditional student: a frozen UNet plus small trainable adapter parameters.

Every adapter kind (``controlnet``, ``t2i_adapter``, ``lora``) is a subclass of
:class:`Student` in its own module, registered by one explicit :func:`register_adapter`
call. :func:`build_student` constructs one by name.

Contract shared by all kinds:

* ``student.encode_condition(cond)`` turns a condition ``[B, C, H, W]`` in ``[0, 1]`` into
  *features*, computed once per image and reused across branches and steps;
* ``student(z, t, encoder_hidden_states, features)`` returns the raw UNet output (the
  teacher's prediction type); ``use_adapter=False`` gives exactly the frozen teacher.
  ``encoder_hidden_states`` is the text conditioning of ``base.encode_prompts`` (a tensor for SD
  1.x/2.x, a dict for SDXL); the base family (:func:`condistill.frozen.family_of` of the UNet)
  turns it into the UNet's keyword arguments;
* at construction the adapter is zero-initialised, so the student's output equals the
  teacher's exactly (unless started from pretrained adapter weights);
* ``student.trainable_named_parameters()`` holds only the adapter's parameters;
* ``student.save_weights(folder)`` writes them in the stock diffusers layout of the kind (one
  file per component of ``Student.weight_components``) and ``student.load_weights(folder,
  weight_files)`` reads them back after the checks of :mod:`condistill.adapters.integrity`
  (safetensors only, exact keys and shapes, finite values).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from condistill.adapters.errors import AdapterWeightsError, check_state_dict_keys, check_state_dict_shapes
from condistill.adapters.integrity import read_checked_weights
from condistill.adapters.registry import add_adapter_class, available_adapters, build_student, get_adapter_class

__all__ = [
    "Student",
    "AdapterWeightsError",
    "register_adapter",
    "get_adapter_class",
    "available_adapters",
    "build_student",
    "check_state_dict_keys",
    "check_state_dict_shapes",
    "pretrained_folder",
    "check_pretrained_fit",
    "weights_file",
    "save_module_folder",
    "base_family",
]

def register_adapter(name: str, cls: type["Student"]) -> None:
    """Register the :class:`Student` subclass ``cls`` under ``name`` (one call per adapter module)."""
    if not (isinstance(cls, type) and issubclass(cls, Student)):
        raise TypeError(f"register_adapter({name!r}, ...) needs a Student subclass, got {cls!r}.")
    add_adapter_class(name, cls)


def pretrained_folder(name_or_path, subfolder: str, config_name: str = "config.json", revision=None) -> Path:
    """Folder holding ``config_name`` for a pretrained adapter: ``path`` itself or ``path/subfolder``."""
    from condistill.hub import resolve_pretrained_dir

    root = resolve_pretrained_dir(name_or_path, revision=revision, what=f"pretrained {subfolder}")
    for candidate in (root, root / subfolder, root / "adapter" / subfolder):
        # a training run's folder holds its own config.json: the module's folder also holds its weights
        if (candidate / config_name).is_file() and any(candidate.glob("diffusion_pytorch_model*")):
            return candidate
    raise FileNotFoundError(
        f"No {config_name} with weights beside it found in {root}, {root / subfolder} or "
        f"{root / 'adapter' / subfolder}; pass a folder saved with "
        f"save_pretrained (a diffusers {subfolder} folder) or a condistill adapter export."
    )


def check_pretrained_fit(problems: list[str], source: str, use_instead: str) -> None:
    """Raise ``ValueError`` when a pretrained module's fit check found ``problems``.

    ``source`` names the module (option and path), ``use_instead`` what to pass instead
    (``"a ControlNet"``); the message lists every problem.
    """
    if problems:
        raise ValueError(
            f"{source} does not fit this base/condition: "
            + "; ".join(problems)
            + f". Use {use_instead} trained for this base and condition type, or leave the option out."
        )


def weights_file(folder: Path, root: Path) -> str:
    """Relative path (to ``root``) of the safetensors weights (or shard index) in ``folder``."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"):
        if (folder / name).is_file():
            return (folder / name).relative_to(root).as_posix()
    if folder.is_dir():
        raise AdapterWeightsError(f"No safetensors weights in {folder}; re-export the adapter with save_adapter.")
    return (folder / "diffusion_pytorch_model.safetensors").relative_to(root).as_posix()


def save_module_folder(module, out_dir: str | os.PathLike, subfolder: str) -> str:
    """``module.save_pretrained(out_dir/subfolder)`` in safetensors; returns the weights' path relative to ``out_dir``."""
    folder = Path(out_dir) / subfolder
    module.save_pretrained(folder, safe_serialization=True)
    return weights_file(folder, Path(out_dir))


def unet_without_lora(unet):
    """``unet`` itself, or, when students or a fake score added peft LoRA layers to it, a plain copy of its own
    weights without them (what ``ControlNetModel.from_unet`` and a full copy of the teacher need)."""
    if not getattr(unet, "peft_config", None):
        return unet
    from diffusers import UNet2DConditionModel

    clone = UNet2DConditionModel.from_config(unet.config)
    clone.load_state_dict({k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k})
    return clone.to(device=unet.device, dtype=unet.dtype)


class Student(nn.Module):
    """A frozen UNet plus trainable adapter parameters (base class of every adapter kind).

    Subclasses set ``kind`` and ``weight_components`` and implement :meth:`_adapter_modules`,
    :meth:`_forward_adapter`, :meth:`encode_condition`, :meth:`save_weights`,
    :meth:`stock_pipeline` and either :meth:`_file_modules` or both :meth:`file_state_dicts` and
    :meth:`_load_file_states`. :meth:`load_weights` is shared: it checks the files first.

    Attributes:
        unet: the frozen teacher UNet (``requires_grad=False``, always in eval mode).
        condition_channels: channels of the condition tensor.
        vae_scale_factor: pixels per latent pixel; the condition is at image resolution.
        adapter_options: JSON-able options that rebuild the same architecture with
            :func:`build_student` (recorded in the exported ``condistill_config.json``).
        initialized_from: path of pretrained adapter weights the student started from, or None.
    """

    kind: ClassVar[str] = ""
    #: ``{component: default file relative to the adapter folder}`` of what :meth:`save_weights`
    #: writes; an exported config's ``weight_files`` must name exactly these components.
    weight_components: ClassVar[dict[str, str]] = {}
    #: diffusers has an img2img pipeline for this kind (``load_adapter`` returns it for a student trained
    #: to take its one step from the input)
    has_img2img: ClassVar[bool] = False
    #: whether the stock pipeline takes a control image (``image=``); False for a condition-free kind
    takes_condition: ClassVar[bool] = True

    def __init__(self, unet, condition_channels: int, vae_scale_factor: int | None = None):
        super().__init__()
        if vae_scale_factor is None:
            raise ValueError(
                "vae_scale_factor is required with a bare UNet (the condition is at image resolution, "
                "the UNet at latent resolution): pass the Base itself, build_student(kind, base, C), "
                "or vae_scale_factor=base.vae_scale_factor (8 for SD 1.x/2.x)."
            )
        if not isinstance(condition_channels, int) or condition_channels < 1:
            raise ValueError(f"condition_channels must be a positive int, got {condition_channels!r}.")
        if not isinstance(vae_scale_factor, int) or vae_scale_factor < 1 or vae_scale_factor & (vae_scale_factor - 1):
            raise ValueError(f"vae_scale_factor must be a power of two (SD: 8), got {vae_scale_factor!r}.")
        if not hasattr(unet, "config") or "block_out_channels" not in unet.config:
            raise TypeError(f"build_student needs a diffusers UNet2DConditionModel (or a Base), got {type(unet).__name__}.")
        from condistill.frozen import family_of

        self.family = family_of(unet.config)
        unet.requires_grad_(False)
        unet.eval()
        self.unet = unet
        self.condition_channels = condition_channels
        self.vae_scale_factor = vae_scale_factor
        self.adapter_options: dict[str, Any] = {}
        self.initialized_from: str | None = None

    # ---- to implement -------------------------------------------------------------
    def _adapter_modules(self) -> dict[str, nn.Module]:
        """``{prefix: module}`` of the trainable parts (prefix used in parameter names)."""
        raise NotImplementedError

    def _forward_adapter(self, z, t, encoder_hidden_states, features) -> torch.Tensor:
        raise NotImplementedError

    def encode_condition(self, cond: torch.Tensor):
        """Features of the condition ``cond [B, C, H, W]`` in ``[0, 1]`` (compute once, reuse)."""
        raise NotImplementedError

    def save_weights(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Write the adapter weights under ``out_dir``; return ``{component: relative file}``."""
        raise NotImplementedError

    def _file_modules(self) -> dict[str, nn.Module]:
        """``{component: module}`` whose ``state_dict()`` is exactly one weight file (stock diffusers folders)."""
        return {}

    def file_state_dicts(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """``{component: state dict keyed as in its file}`` of what :meth:`save_weights` writes."""
        return {component: module.state_dict() for component, module in self._file_modules().items()}

    def _load_file_states(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Copy checked ``{component: state}`` (keys of :meth:`file_state_dicts`) into the adapter."""
        for component, module in self._file_modules().items():
            module.load_state_dict(states[component], strict=True)

    def check_weight_files(self, files: Mapping[str, Path]) -> None:
        """Kind-specific checks of the files beyond keys and shapes (e.g. LoRA metadata); default none."""

    def load_weights(self, folder: str | os.PathLike, weight_files: Mapping[str, str] | None = None) -> None:
        """Load weights written by :meth:`save_weights` from ``folder``.

        ``weight_files`` is ``{component: relative file}`` as recorded in the adapter config
        (default: the kind's :attr:`weight_components`). Nothing is loaded unless every file is
        safetensors, holds exactly this student's tensors with their shapes, and is finite.

        Raises:
            AdapterWeightsError: naming the file and tensors that fail a check.
        """
        self._load_file_states(read_checked_weights(self, folder, weight_files))

    @classmethod
    def diffusers_snippet(cls, base: str, weight_files: Mapping[str, str], family=None) -> list[str]:
        """Lines of plain diffusers code that build ``pipe`` for this kind from ``ADAPTER`` (the adapter
        folder or repo id) and ``base`` (shown in the model card; the scheduler line follows them).
        ``family`` is the base's :class:`condistill.frozen.BaseFamily` (or its name; default SD 1.x/2.x)."""
        raise NotImplementedError

    @classmethod
    def stock_pipeline(cls, adapter_dir: Path, weight_files: Mapping[str, str], components: Mapping[str, Any], dtype,
                       family=None):
        """The stock diffusers pipeline that runs this kind's exported adapter.

        Args:
            adapter_dir: the exported adapter folder.
            weight_files: ``{component: relative file}`` recorded by :meth:`save_weights`.
            components: the base pipeline's modules (``vae``, the text encoders and tokenizers,
                ``unet``, ``scheduler`` already set to the few-step scheduler, and the optional
                ``safety_checker``, ``feature_extractor``, ``image_encoder``); shared, not copied.
            dtype: dtype of the adapter modules to load.
            family: the base's :class:`condistill.frozen.BaseFamily`, which names the pipeline
                classes (default: the family of ``components["unet"]``).
        """
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------
    def _trainable(self, module: nn.Module) -> nn.Module:
        """``module`` made trainable, in train mode, on the UNet's device.

        Always trainable, also when started from pretrained weights: a ``from_pretrained`` model
        that silently stayed frozen would train nothing.
        """
        module.requires_grad_(True)
        module.train()
        return module.to(next(self.unet.parameters()).device)

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        features=None,
        use_adapter: bool = True,
    ) -> torch.Tensor:
        """Raw UNet output (epsilon or v, the teacher's prediction type) at ``(z, t)``.

        Args:
            z: noisy latents ``[B, C, h, w]``.
            t: timesteps ``[B]`` (or a scalar) in ``[0, T)``.
            encoder_hidden_states: the text conditioning of ``base.encode_prompts`` (SD: text
                embeddings ``[B, L, D]``; SDXL: a dict, see :class:`condistill.frozen.SDXLFamily`).
            features: output of :meth:`encode_condition` for the same batch (required when
                ``use_adapter`` is True).
            use_adapter: False runs exactly the frozen teacher (no condition, no LoRA).
        """
        if not use_adapter:
            return self._forward_teacher(z, t, encoder_hidden_states)
        if features is None:
            raise ValueError(
                "features is None: compute them once with student.encode_condition(cond) and pass them, "
                "or call with use_adapter=False for the plain teacher."
            )
        return self._forward_adapter(z, t, encoder_hidden_states, features)

    def _forward_teacher(self, z, t, encoder_hidden_states) -> torch.Tensor:
        return self.unet(z, t, **self.text_kwargs(encoder_hidden_states, z), return_dict=False)[0]

    def text_kwargs(self, text, z: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The UNet / ControlNet keyword arguments of the text conditioning ``text`` for latents ``z``
        (cast to ``dtype`` when given), as the base family says."""
        return self.family.unet_kwargs(text, z, self.vae_scale_factor, dtype)

    def _check_condition(self, cond: torch.Tensor, multiple: int) -> None:
        if not isinstance(cond, torch.Tensor) or cond.ndim != 4 or cond.shape[1] != self.condition_channels:
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(
                f"The condition must be a tensor [B, {self.condition_channels}, H, W] in [0, 1] at image "
                f"resolution; got {shape}."
            )
        if cond.shape[-1] % multiple or cond.shape[-2] % multiple:
            raise ValueError(
                f"Condition size {tuple(cond.shape[-2:])} must be divisible by {multiple}; "
                f"resize the images to a multiple of {multiple} pixels."
            )

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the adapter's parameters only (the frozen UNet is excluded)."""
        out: dict[str, nn.Parameter] = {}
        for prefix, module in self._adapter_modules().items():
            for name, param in module.named_parameters():
                out[f"{prefix}.{name}"] = param
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of :meth:`trainable_named_parameters` (e.g. to initialise an EMA)."""
        return {k: v.detach().clone() for k, v in self.trainable_named_parameters().items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` (keys of :meth:`trainable_named_parameters`) into the adapter in place."""
        params = self.trainable_named_parameters()
        check_state_dict_keys(params, state, "the given trainable state dict")
        check_state_dict_shapes(params, state, "the given trainable state dict")
        for k, p in params.items():
            p.copy_(state[k].to(device=p.device, dtype=p.dtype))

    def num_trainable_parameters(self) -> int:
        """Number of trainable adapter parameters."""
        return sum(p.numel() for p in self.trainable_named_parameters().values())

    def train(self, mode: bool = True) -> "Student":
        """Set the adapter's train mode; the frozen UNet stays in eval mode."""
        super().train(mode)
        self.unet.eval()
        return self

    def shared_frozen_blocks(self) -> list[nn.Module]:
        """Frozen blocks that see the same inputs in the online and ODE branches of a step.

        The objective runs them once for both (:func:`condistill.adapters.shared_pass.shared_frozen_blocks`).
        None by default: an adapter that changes what a UNet block sees or computes (T2I-Adapter
        features inside the down blocks, LoRA layers) shares nothing.
        """
        return []

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in the UNet and the adapter modules that support it."""
        for module in [self.unet, *self._adapter_modules().values()]:
            # diffusers models that cannot checkpoint (e.g. T2IAdapter) raise instead; they are small
            if hasattr(module, "enable_gradient_checkpointing") and getattr(
                module, "_supports_gradient_checkpointing", True
            ):
                module.enable_gradient_checkpointing()

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, condition_channels={self.condition_channels}, "
            f"vae_scale_factor={self.vae_scale_factor}, trainable={self.num_trainable_parameters():,}"
        )


def base_family(family=None, unet=None):
    """A :class:`condistill.frozen.BaseFamily`: ``family`` itself, its name, else the family of ``unet``'s config
    (SD 1.x/2.x without either)."""
    from condistill.frozen import FAMILIES, SD, family_of

    if isinstance(family, str):
        return FAMILIES[family]
    if family is not None:
        return family
    return family_of(unet.config) if unet is not None else SD


def unet_residual_layout(unet) -> list[tuple[int, int]]:
    """``(channels, downscale vs. latent)`` of each T2I-Adapter residual the UNet accepts.

    diffusers adds the i-th ``down_intrablock_additional_residuals`` entry inside a
    cross-attention down block before its downsampler, but *after* a plain ``DownBlock2D``
    including its downsampler (see ``UNet2DConditionModel.forward``).
    """
    layout = []
    scale = 1
    for i, block in enumerate(unet.down_blocks):
        channels = unet.config.block_out_channels[i]
        downsamples = getattr(block, "downsamplers", None) is not None
        if getattr(block, "has_cross_attention", False):
            layout.append((channels, scale))
            scale *= 2 if downsamples else 1
        else:
            scale *= 2 if downsamples else 1
            layout.append((channels, scale))
    return layout
