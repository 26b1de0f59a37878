"""The frozen teacher: a Stable Diffusion 1.x/2.x model in diffusers layout.

:func:`load_base` loads the VAE, text encoder, tokenizer and UNet of a diffusers
``StableDiffusionPipeline`` folder (or a hub id found in the local Hugging Face cache),
freezes them, and reads the teacher's noise schedule from its scheduler config.
:class:`Base` bundles them with the three encode/decode helpers the training loop needs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from condistill.hub import resolve_pretrained_dir
from condistill.method.schedule import make_alphas_cumprod, normalize_prediction_type
from condistill.utils import jsonable

__all__ = [
    "Base",
    "load_base",
    "compute_fingerprint",
    "fingerprint_mismatch",
    "NOISE_SCHEDULE_KEYS",
    "NOISE_SCHEDULE_DEFAULTS",
]

#: Scheduler config keys that define the teacher's noise schedule (copied into the few-step
#: scheduler config of an exported adapter).
NOISE_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)

NOISE_SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}


# --------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------


def compute_fingerprint(unet_config: Mapping[str, Any], prediction_type: str) -> dict[str, Any]:
    """A small JSON-able dict identifying a base architecture (used to detect a base mismatch).

    Args:
        unet_config: the UNet's config (``unet.config``).
        prediction_type: the teacher's prediction type (any alias; normalised here).

    Returns:
        ``{"in_channels", "out_channels", "block_out_channels", "cross_attention_dim",
        "sample_size", "prediction_type"}`` with lists instead of tuples.
    """

    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return {
        "in_channels": int(unet_config["in_channels"]),
        "out_channels": int(unet_config["out_channels"]),
        "block_out_channels": plain(unet_config["block_out_channels"]),
        "cross_attention_dim": plain(unet_config["cross_attention_dim"]),
        "sample_size": plain(unet_config["sample_size"]),
        "prediction_type": normalize_prediction_type(prediction_type),
    }


def fingerprint_mismatch(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Describe every differing key of two fingerprints (empty list when they match).

    Keys present in only one of them are ignored, so older fingerprints with fewer keys still
    compare. Values are compared after a JSON round trip (tuples equal lists).
    """


    problems = []
    for key in sorted(set(expected) & set(actual)):
        if jsonable(expected[key]) != jsonable(actual[key]):
            problems.append(f"{key}: {expected[key]!r} != {actual[key]!r}")
    return problems


# --------------------------------------------------------------------------------------
# the frozen base
# --------------------------------------------------------------------------------------


@dataclass
class Base:
    """A frozen latent-diffusion teacher and its noise schedule.

    Attributes:
        vae, text_encoder, tokenizer, unet: diffusers / transformers modules, frozen
            (``requires_grad=False``) and in eval mode.
        alphas_cumprod: float32 ``[T]`` tensor (on CPU) of the teacher's ``abar_t``.
        num_train_timesteps: ``T``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (normalised from the scheduler config).
        vae_scale_factor: pixels per latent pixel, ``2 ** (len(vae.config.block_out_channels) - 1)``.
        latent_channels: channels of the latent (``vae.config.latent_channels``).
        resolution: native image size in pixels, ``unet.config.sample_size * vae_scale_factor``.
        name_or_path: what was passed to :func:`load_base` (folder or hub id).
        scheduler_config: the teacher's raw scheduler config (a plain dict).
    """

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str
    vae_scale_factor: int
    latent_channels: int
    resolution: int
    name_or_path: str
    scheduler_config: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Device of the UNet."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the UNet."""
        return next(self.unet.parameters()).dtype

    def fingerprint(self) -> dict[str, Any]:
        """Architecture fingerprint of this base, see :func:`compute_fingerprint`."""
        return compute_fingerprint(self.unet.config, self.prediction_type)

    def noise_schedule_config(self) -> dict[str, Any]:
        """The noise-schedule part of the teacher's scheduler config (keys :data:`NOISE_SCHEDULE_KEYS`).

        Missing keys get diffusers' scheduler defaults. Pass the result as ``noise_schedule`` to
        :func:`condistill.adapters.save_load.save_adapter` so the exported few-step scheduler uses exactly
        the teacher's ``abar_t``.
        """
        out = {}
        for key in NOISE_SCHEDULE_KEYS:
            value = self.scheduler_config.get(key, NOISE_SCHEDULE_DEFAULTS[key])
            out[key] = list(value) if isinstance(value, (tuple, list)) else value
        return out

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``[B, L, D]`` of ``prompts`` exactly as the stock SD pipelines compute them.

        Prompts are padded / truncated to ``tokenizer.model_max_length``; the attention mask is
        passed only when the text encoder's config asks for it (``use_attention_mask``), as in
        ``StableDiffusionPipeline.encode_prompt``. The empty string ``""`` gives the
        unconditional embedding used for classifier-free guidance.
        """
        if isinstance(prompts, str):
            raise TypeError(f"encode_prompts takes a list of strings; wrap a single prompt: [{prompts!r}].")
        prompts = list(prompts)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return hidden.to(dtype=self.dtype)

    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Latents ``[B, C, H/f, W/f]`` of images ``pixels [B, 3, H, W]`` in ``[-1, 1]``.

        Uses the mean of the VAE's latent distribution by default (deterministic: the same image
        always gives the same ``z0``); ``sample=True`` draws from it instead (with ``generator``).
        The result is ``(latent - shift_factor) * scaling_factor`` (``shift_factor`` is absent,
        i.e. 0, for SD 1.x/2.x), the scale the UNet was trained on.
        """
        if pixels.ndim != 4 or pixels.shape[1] != self.vae.config.in_channels:
            raise ValueError(
                f"encode_images expects pixels [B, {self.vae.config.in_channels}, H, W] in [-1, 1], "
                f"got shape {tuple(pixels.shape)}."
            )
        f = self.vae_scale_factor
        if pixels.shape[-1] % f or pixels.shape[-2] % f:
            raise ValueError(
                f"Image size {tuple(pixels.shape[-2:])} is not divisible by the VAE factor {f}; "
                f"resize or crop the images to a multiple of {f}."
            )
        vae_param = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
        latents = dist.sample(generator=generator) if sample else dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` (clamped) from scaled latents (inverse of :meth:`encode_images`)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        vae_param = next(self.vae.parameters())
        z = latents.to(device=vae_param.device, dtype=vae_param.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)

    def to(self, device=None, dtype=None) -> "Base":
        """Move the modules to ``device`` / ``dtype`` in place and return ``self``."""
        for module in (self.vae, self.text_encoder, self.unet):
            module.to(device=device, dtype=dtype)
        return self


def native_resolution(name_or_path: str | os.PathLike, revision: str | None = None) -> int:
    """The base's native image size in pixels, read from its UNet and VAE configs (no weights load).

    Equals :attr:`Base.resolution` of :func:`load_base`.
    """
    root = resolve_pretrained_dir(name_or_path, revision=revision, what="base model")
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{os.fspath(name_or_path)!r} ({root}) is not a Stable Diffusion folder in diffusers "
                                f"layout: {error}") from None
    sample = unet.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)


def _freeze(module):
    module.requires_grad_(False)
    module.eval()
    return module


def load_base(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> Base:
    """Load a frozen Stable Diffusion teacher from a diffusers folder or a hub id.

    Args:
        name_or_path: a local diffusers ``StableDiffusionPipeline`` folder (with ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``) or a hub repo id
            resolved from the local Hugging Face cache (see :func:`resolve_pretrained_dir`).
        device: where the modules go.
        dtype: floating-point dtype of the modules (``alphas_cumprod`` stays float32).
        revision: hub revision (branch, tag or commit), ignored for local folders.

    Returns:
        A :class:`Base` whose modules are frozen and in eval mode.

    Raises:
        FileNotFoundError: the folder / repo is not found, or lacks a required subfolder.
        ValueError: the scheduler's prediction type is not supported.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root = resolve_pretrained_dir(name_or_path, revision=revision, what="base model")
    missing = [sub for sub in ("vae", "text_encoder", "tokenizer", "unet", "scheduler") if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{os.fspath(name_or_path)!r} ({root}) is not a Stable Diffusion folder in diffusers layout: "
            f"missing subfolder(s) {missing}. Pass a folder saved with "
            "StableDiffusionPipeline.save_pretrained (or a hub id of such a repo)."
        )
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise FileNotFoundError(f"{scheduler_file} is missing; the base needs its scheduler config.")
    scheduler_config = json.loads(scheduler_file.read_text())
    prediction_type = normalize_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"The base {os.fspath(name_or_path)!r} predicts {prediction_type!r}; condistill supports "
            "'epsilon' (SD 1.x) and 'v_prediction' (SD 2.x) teachers."
        )
    schedule = {k: scheduler_config.get(k, NOISE_SCHEDULE_DEFAULTS[k]) for k in NOISE_SCHEDULE_KEYS}
    alphas_cumprod = make_alphas_cumprod(**schedule)

    vae = _freeze(AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype))
    unet = _freeze(UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype))
    text_encoder = _freeze(CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype))
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    for module in (vae, unet, text_encoder):
        module.to(device)

    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    if isinstance(sample_size, (tuple, list)):
        sample_size = sample_size[0]
    return Base(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        alphas_cumprod=alphas_cumprod,
        num_train_timesteps=int(schedule["num_train_timesteps"]),
        prediction_type=prediction_type,
        vae_scale_factor=vae_scale_factor,
        latent_channels=int(vae.config.latent_channels),
        resolution=int(sample_size) * vae_scale_factor,
        name_or_path=os.fspath(name_or_path),
        scheduler_config=dict(scheduler_config),
    )
