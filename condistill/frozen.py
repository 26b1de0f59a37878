"""The frozen teacher: a Stable Diffusion 1.x/2.x or SDXL model in diffusers layout.

:func:`load_base` loads the VAE, text encoder(s), tokenizer(s) and UNet of a diffusers
``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` folder (or a hub id found in the
local Hugging Face cache), freezes them, and reads the teacher's noise schedule from its
scheduler config. :class:`Base` bundles them with the encode/decode helpers the training loop
needs. What differs between the families (text encoders, the form of the UNet's text
conditioning, the stock pipelines) is a :class:`BaseFamily`, chosen by :func:`family_of`.
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

__all__ = ["Base", "BaseFamily", "SD", "SDXL", "FAMILIES", "family_of", "load_base", "native_resolution",
           "compute_fingerprint", "fingerprint_mismatch", "base_architecture", "NOISE_SCHEDULE_KEYS", "NOISE_SCHEDULE_DEFAULTS"]

#: Scheduler config keys that define the teacher's noise schedule (copied into the few-step
#: scheduler config of an exported adapter).
NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "rescale_betas_zero_snr")
NOISE_SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                           "beta_schedule": "linear", "trained_betas": None, "rescale_betas_zero_snr": False}


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
        "sample_size", "prediction_type"}`` with lists instead of tuples, plus ``"family"``
        (e.g. ``"sdxl"``) for every family but SD 1.x/2.x (whose fingerprints predate the key).
    """

    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    out = {
        "in_channels": int(unet_config["in_channels"]),
        "out_channels": int(unet_config["out_channels"]),
        "block_out_channels": plain(unet_config["block_out_channels"]),
        "cross_attention_dim": plain(unet_config["cross_attention_dim"]),
        "sample_size": plain(unet_config["sample_size"]),
        "prediction_type": normalize_prediction_type(prediction_type),
    }
    family = family_of(unet_config)
    if family is not SD:
        out["family"] = family.name
    return out


def fingerprint_mismatch(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Describe every differing key of two fingerprints (empty list when they match).

    Keys present in only one of them are ignored, so older fingerprints with fewer keys still
    compare; a missing ``"family"`` means SD 1.x/2.x. Values are compared after a JSON round trip
    (tuples equal lists).
    """
    expected, actual = {"family": SD.name, **expected}, {"family": SD.name, **actual}
    problems = []
    for key in sorted(set(expected) & set(actual)):
        if jsonable(expected[key]) != jsonable(actual[key]):
            problems.append(f"{key}: {expected[key]!r} != {actual[key]!r}")
    return problems


# --------------------------------------------------------------------------------------
# base families: everything that differs between SD 1.x/2.x and SDXL
# --------------------------------------------------------------------------------------


class BaseFamily:
    """What differs between base families, asked in one place instead of branching elsewhere.

    One instance per family (:data:`SD`, :data:`SDXL`); :func:`family_of` picks it from the
    UNet's config (its ``addition_embed_type``). A family says:

    * :attr:`text_parts`: the ``(text encoder, tokenizer, transformers class)`` subfolders it loads;
    * :meth:`encode_prompts`: prompts -> the UNet's *text conditioning* (a tensor for SD, a
      dict of ``[B, ...]`` tensors for SDXL);
    * :meth:`unet_kwargs`: text conditioning -> the keyword arguments of a UNet / ControlNet call;
    * :meth:`pipeline`: the stock diffusers pipeline of a role (``"text"``, ``"controlnet"``,
      ``"adapter"``, ``"controlnet_img2img"``) built from shared components.
    """

    name: str = ""
    label: str = ""
    text_parts: tuple[tuple[str, str, str], ...] = ()
    #: role -> diffusers pipeline class name
    pipelines: Mapping[str, str] = {}
    #: keyword arguments of ``from_pretrained`` of the ``"text"`` pipeline
    load_kwargs: Mapping[str, Any] = {}

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components every role needs."""
        return ("vae", *(part for parts in self.text_parts for part in parts[:2]), "unet", "scheduler")

    def pipeline_class(self, role: str):
        import diffusers

        return getattr(diffusers, self.pipelines[role])

    def pipeline(self, role: str, components: Mapping[str, Any], **modules):
        """The ``role`` pipeline on ``components`` (+ ``modules``), given only what its class takes."""
        import inspect

        cls = self.pipeline_class(role)
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in {**components, **modules}.items() if k in accepted})

    def encode_prompts(self, base: "Base", prompts: list[str]):
        raise NotImplementedError

    def unet_kwargs(self, text, sample: torch.Tensor, vae_scale_factor: int, dtype=None) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<base family {self.name}>"


class SDFamily(BaseFamily):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder; the conditioning is its last hidden state ``[B, L, D]``."""

    name, label = "sd", "Stable Diffusion 1.x/2.x"
    text_parts = (("text_encoder", "tokenizer", "CLIPTextModel"),)
    pipelines = {"text": "StableDiffusionPipeline", "controlnet": "StableDiffusionControlNetPipeline",
                 "adapter": "StableDiffusionAdapterPipeline", "controlnet_img2img": "StableDiffusionControlNetImg2ImgPipeline"}
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def encode_prompts(self, base, prompts):
        # exactly StableDiffusionPipeline.encode_prompt (attention mask only when the encoder asks for it)
        tokens = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(base.text_encoder.parameters()).device
        mask = None
        if getattr(base.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = base.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return hidden.to(dtype=base.dtype)

    def unet_kwargs(self, text, sample, vae_scale_factor, dtype=None):
        if not isinstance(text, torch.Tensor):
            raise TypeError(f"This {self.label} UNet takes text embeddings [B, L, D] (base.encode_prompts), "
                            f"got {type(text).__name__}.")
        return {"encoder_hidden_states": text if dtype is None else text.to(dtype)}


class SDXLFamily(BaseFamily):
    """SDXL: two CLIP text encoders. The conditioning is a dict of ``[B, ...]`` tensors:

    * ``encoder_hidden_states`` ``[B, L, D1 + D2]``: both encoders' penultimate hidden states, concatenated;
    * ``text_embeds`` ``[B, P]``: the pooled, projected output of the second encoder;
    * ``time_ids`` ``[B, 6]`` (optional): SDXL's size/crop micro-conditioning ``(original h, w, crop
      top, left, target h, w)``; when absent, :meth:`unet_kwargs` uses ``(H, W, 0, 0, H, W)`` of the
      latent's pixel size, the stock pipelines' default.

    ``""`` encodes to zeros when the pipeline config says ``force_zeros_for_empty_prompt`` (the
    default of SDXL), the unconditional embedding the stock SDXL pipelines guide with.
    """

    name, label = "sdxl", "Stable Diffusion XL"
    text_parts = (("text_encoder", "tokenizer", "CLIPTextModel"),
                  ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"))
    pipelines = {"text": "StableDiffusionXLPipeline", "controlnet": "StableDiffusionXLControlNetPipeline",
                 "adapter": "StableDiffusionXLAdapterPipeline",
                 "controlnet_img2img": "StableDiffusionXLControlNetImg2ImgPipeline"}
    load_kwargs = {}
    KEYS = ("encoder_hidden_states", "text_embeds")

    def encode_prompts(self, base, prompts):
        # as StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both encoders,
        # the pooled output of the first one that has it (the projection model)
        hidden, pooled = [], None
        for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise TypeError("The SDXL base's text_encoder_2 gives no pooled output; it must be a "
                            "CLIPTextModelWithProjection.")
        hidden = torch.cat(hidden, dim=-1).to(base.dtype)
        pooled = pooled.to(device=hidden.device, dtype=base.dtype)
        if base.pipeline_config.get("force_zeros_for_empty_prompt", True):
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def unet_kwargs(self, text, sample, vae_scale_factor, dtype=None):
        if not isinstance(text, Mapping) or any(k not in text for k in self.KEYS):
            got = sorted(text) if isinstance(text, Mapping) else type(text).__name__
            raise TypeError(f"This {self.label} UNet takes the text conditioning of base.encode_prompts: a dict with "
                            f"{list(self.KEYS)} (and optionally time_ids), got {got}.")
        pooled = text["text_embeds"]
        time_ids = text.get("time_ids")
        if time_ids is None:
            h, w = sample.shape[-2] * vae_scale_factor, sample.shape[-1] * vae_scale_factor
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=pooled.device, dtype=pooled.dtype)
            time_ids = time_ids.expand(pooled.shape[0], 6)
        extra = {"text_embeds": pooled, "time_ids": time_ids}
        hidden = text["encoder_hidden_states"]
        if dtype is not None:
            hidden, extra = hidden.to(dtype), {k: v.to(dtype) for k, v in extra.items()}
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": extra}


SD, SDXL = SDFamily(), SDXLFamily()
FAMILIES = {family.name: family for family in (SD, SDXL)}


def family_of(unet_config: Mapping[str, Any]) -> BaseFamily:
    """The :class:`BaseFamily` of a UNet config: SDXL for ``addition_embed_type="text_time"``, else SD.

    Raises:
        ValueError: another ``addition_embed_type`` (a family condistill does not support).
    """
    kind = unet_config.get("addition_embed_type")
    if kind is None:
        return SD
    if kind == "text_time":
        return SDXL
    raise ValueError(f"This UNet's addition_embed_type={kind!r} belongs to no supported base family; condistill "
                     f"supports {', '.join(f.label for f in FAMILIES.values())} (UNet2DConditionModel) bases.")


# --------------------------------------------------------------------------------------
# the frozen base
# --------------------------------------------------------------------------------------


@dataclass
class Base:
    """A frozen latent-diffusion teacher and its noise schedule.

    Attributes:
        vae, text_encoder, tokenizer, unet: diffusers / transformers modules, frozen
            (``requires_grad=False``) and in eval mode. The VAE stays in float32 when its
            config says ``force_upcast`` and the base is loaded in float16 (SDXL's VAE overflows
            in float16).
        alphas_cumprod: float32 ``[T]`` tensor (on CPU) of the teacher's ``abar_t``.
        num_train_timesteps: ``T``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (normalised from the scheduler config).
        vae_scale_factor: pixels per latent pixel, ``2 ** (len(vae.config.block_out_channels) - 1)``.
        latent_channels: channels of the latent (``vae.config.latent_channels``).
        resolution: native image size in pixels, ``unet.config.sample_size * vae_scale_factor``.
        name_or_path: what was passed to :func:`load_base` (folder or hub id).
        scheduler_config: the teacher's raw scheduler config (a plain dict).
        text_encoder_2, tokenizer_2: SDXL's second text encoder and tokenizer (None for SD).
        family: the :class:`BaseFamily` (:data:`SD` or :data:`SDXL`).
        pipeline_config: the non-component entries of ``model_index.json`` (e.g. SDXL's
            ``force_zeros_for_empty_prompt``).
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
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: BaseFamily = SD
    pipeline_config: dict = field(default_factory=dict)

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
    def encode_prompts(self, prompts: Sequence[str]):
        """The UNet's text conditioning of ``prompts``, exactly as the stock pipelines compute it.

        SD 1.x/2.x: the text embeddings ``[B, L, D]`` (padded / truncated to
        ``tokenizer.model_max_length``; the attention mask is passed only when the text encoder's
        config asks for it, as in ``StableDiffusionPipeline.encode_prompt``). SDXL: a dict of
        ``[B, ...]`` tensors, see :class:`SDXLFamily`. The empty string ``""`` gives the
        unconditional conditioning used for classifier-free guidance.
        """
        if isinstance(prompts, str):
            raise TypeError(f"encode_prompts takes a list of strings; wrap a single prompt: [{prompts!r}].")
        return self.family.encode_prompts(self, list(prompts))

    def predict(self, z: torch.Tensor, t: torch.Tensor | int, text) -> torch.Tensor:
        """The frozen teacher's raw output at ``(z, t)`` for the text conditioning ``text`` (:meth:`encode_prompts`)."""
        return self.unet(z, t, **self.family.unet_kwargs(text, z, self.vae_scale_factor), return_dict=False)[0]

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
        for module in (self.text_encoder, self.text_encoder_2, self.unet):
            if module is not None:
                module.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=None if dtype is None else _vae_dtype(self.vae.config, dtype))
        return self


def base_architecture(name_or_path, revision=None) -> tuple[int, int, int]:
    """``(UNet sample size, VAE factor, UNet down-samplings)`` read from the base's configs (no weights load)."""
    root = resolve_pretrained_dir(name_or_path, revision=revision, what="base model")
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{os.fspath(name_or_path)!r} ({root}) is not a Stable Diffusion folder in diffusers "
                                f"layout: {error}") from None
    sample = unet.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    # every UNet down block but the last halves the latent
    return int(sample), 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1), len(unet.get("block_out_channels", [0] * 4)) - 1


def native_resolution(name_or_path: str | os.PathLike, revision: str | None = None) -> int:
    """The base's native image size in pixels (:attr:`Base.resolution`), read from its configs (no weights load)."""
    sample, factor, _ = base_architecture(name_or_path, revision)
    return sample * factor


def _vae_dtype(vae_config, dtype: torch.dtype) -> torch.dtype:
    """float32 for a VAE whose config asks ``force_upcast`` when the base runs in float16, else ``dtype``."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", False) else dtype


def _read_json(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


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
    """Load a frozen Stable Diffusion (1.x/2.x or XL) teacher from a diffusers folder or a hub id.

    Args:
        name_or_path: a local diffusers ``StableDiffusionPipeline`` folder (with ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``), a
            ``StableDiffusionXLPipeline`` folder (also ``text_encoder_2/``, ``tokenizer_2/``), or a
            hub repo id resolved from the local Hugging Face cache (see :func:`resolve_pretrained_dir`).
        device: where the modules go.
        dtype: floating-point dtype of the modules (``alphas_cumprod`` stays float32; a
            ``force_upcast`` VAE stays float32 under float16).
        revision: hub revision (branch, tag or commit), ignored for local folders.

    Returns:
        A :class:`Base` whose modules are frozen and in eval mode.

    Raises:
        FileNotFoundError: the folder / repo is not found, or lacks a required subfolder.
        ValueError: the scheduler's prediction type or the UNet's family is not supported.
    """
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer

    root = resolve_pretrained_dir(name_or_path, revision=revision, what="base model")
    family = family_of(_read_json(root / "unet" / "config.json"))
    missing = [sub for sub in family.components if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{os.fspath(name_or_path)!r} ({root}) is not a {family.label} folder in diffusers layout: "
            f"missing subfolder(s) {missing}. Pass a folder saved with "
            f"{family.pipelines['text']}.save_pretrained (or a hub id of such a repo)."
        )
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise FileNotFoundError(f"{scheduler_file} is missing; the base needs its scheduler config.")
    scheduler_config = json.loads(scheduler_file.read_text())
    prediction_type = normalize_prediction_type(scheduler_config.get("prediction_type", "epsilon"))
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"The base {os.fspath(name_or_path)!r} predicts {prediction_type!r}; condistill supports "
            "'epsilon' (SD 1.x, SDXL) and 'v_prediction' (SD 2.x) teachers."
        )
    schedule = {k: scheduler_config.get(k, NOISE_SCHEDULE_DEFAULTS[k]) for k in NOISE_SCHEDULE_KEYS}
    alphas_cumprod = make_alphas_cumprod(**schedule)

    vae_config = AutoencoderKL.load_config(root, subfolder="vae")
    vae = _freeze(AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=_vae_dtype(vae_config, dtype)))
    unet = _freeze(UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype))
    text = {}
    for encoder, tokenizer, cls in family.text_parts:
        text[encoder] = _freeze(getattr(transformers, cls).from_pretrained(root / encoder, dtype=dtype)).to(device)
        text[tokenizer] = AutoTokenizer.from_pretrained(root / tokenizer)
    vae.to(device)
    unet.to(device)
    index = _read_json(root / "model_index.json")

    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    if isinstance(sample_size, (tuple, list)):
        sample_size = sample_size[0]
    return Base(
        vae=vae,
        unet=unet,
        alphas_cumprod=alphas_cumprod,
        num_train_timesteps=int(schedule["num_train_timesteps"]),
        prediction_type=prediction_type,
        vae_scale_factor=vae_scale_factor,
        latent_channels=int(vae.config.latent_channels),
        resolution=int(sample_size) * vae_scale_factor,
        name_or_path=os.fspath(name_or_path),
        scheduler_config=dict(scheduler_config),
        family=family,
        pipeline_config={k: v for k, v in index.items() if not isinstance(v, list) and not k.startswith("_")},
        **text,
    )
