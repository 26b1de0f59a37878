"""Latent-space samplers used by validation and evaluation.

They run the same scheduler classes a stock diffusers pipeline would use, on tensors
already on the device, so a validation grid costs a few forward passes and no pipeline
construction. Users sample through ``load_adapter`` pipelines instead.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, LCMScheduler

from condistill.method.guidance import guided_output
from condistill.method.codi_scheduler import CoDiScheduler
from condistill.seeding import torch_generator

ModelFn = Callable[..., torch.Tensor]
# the sampler names served by CoDiScheduler (the only ones that can start from a noised image)
CODI_SAMPLERS = ("codi", "codi-stochastic")


@torch.no_grad()
def start_latents(base, condition, cond: torch.Tensor) -> torch.Tensor:
    """The float32 latents ``[B, c, h, w]`` that sampling from the input starts from, for a batch of
    conditions ``cond``: the condition's own image encoded (``Condition.start_image``: sr, inpaint),
    or the zero latent for conditions that are not images (edge, depth).

    Training (``--dmd-start-timestep``) and evaluation rows with a start both use it, so a student
    is sampled from exactly the start it was trained on.
    """
    if condition.has_start_image():
        return base.encode_images(condition.start_image(cond).to(base.device, base.dtype)).float()
    f = base.vae_scale_factor
    h, w = cond.shape[-2] // f, cond.shape[-1] // f  # the latents of the condition's own size (the run's resolution)
    return torch.zeros((cond.shape[0], base.latent_channels, h, w), device=base.device)


def make_scheduler(base, kind: str = "codi", *, num_grid: int = 50, stochastic: bool = False):
    """A scheduler on the base's noise schedule: ``codi`` (few-step), ``codi-stochastic`` (the
    same, re-noising with fresh noise between steps), ``ddim`` or ``lcm``."""
    config = dict(base.scheduler_config)
    if kind in CODI_SAMPLERS:
        return CoDiScheduler.from_config(config, num_grid=num_grid, stochastic=stochastic or kind == "codi-stochastic",
                                         prediction_type=base.prediction_type)
    if kind == "ddim":
        return DDIMScheduler.from_config(config, prediction_type=base.prediction_type,
                                         set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    if kind == "lcm":
        return LCMScheduler.from_config(config, prediction_type=base.prediction_type,
                                        original_inference_steps=num_grid, clip_sample=False)
    raise ValueError(f"unknown sampler {kind!r}; choose codi, codi-stochastic, ddim or lcm")


@torch.no_grad()
def sample_latents(
    model_fn: ModelFn,
    scheduler,
    shape: tuple[int, ...],
    text_emb: torch.Tensor,
    uncond_emb: torch.Tensor,
    num_steps: int,
    *,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init_latents: torch.Tensor | None = None,
    start_timestep: int | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Run ``num_steps`` of ``scheduler`` from pure noise, or from ``init_latents`` noised to ``start_timestep``.

    ``model_fn(z [B,4,h,w], t [B], text, **model_kwargs)`` returns the raw model output; ``text``
    is the text conditioning of ``base.encode_prompts`` (``[B, L, D]``, or SDXL's dict).
    ``guidance_scale > 1`` applies classifier-free guidance with the empty-prompt conditioning
    ``uncond_emb`` (batch 1 or B). Returns the final latents.

    With ``init_latents`` (``shape``) and ``start_timestep`` (a point of the CoDi scheduler's grid),
    sampling starts from ``scheduler.add_noise(init_latents, noise, start_timestep)`` and takes
    ``num_steps`` steps from there (SDEdit-style): a condition that is itself an image (sr's
    up-scaled input, inpaint's known pixels) then gives the student its layout, and noise only
    the detail. Only the CoDi schedulers take a start timestep.
    """
    if (init_latents is None) != (start_timestep is None):
        raise ValueError("init_latents and start_timestep go together: give both to start from an image, or neither.")
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    if init_latents is None:  # the timesteps first, as the stock pipelines do: they may set init_noise_sigma
        scheduler.set_timesteps(num_steps, device=device)
        z = noise * scheduler.init_noise_sigma
    else:
        if not isinstance(scheduler, CoDiScheduler):
            raise ValueError(f"starting from an image needs a CoDi sampler (codi or codi-stochastic), "
                             f"not {type(scheduler).__name__}.")
        if tuple(init_latents.shape) != tuple(shape):
            raise ValueError(f"init_latents have shape {tuple(init_latents.shape)}, expected {tuple(shape)}.")
        scheduler.set_timesteps(num_steps, device=device, start_timestep=start_timestep)
        z = scheduler.add_noise(init_latents.to(device=device, dtype=dtype), noise, int(start_timestep))
    b = shape[0]
    for t in scheduler.timesteps:
        tt = torch.full((b,), int(t), device=device, dtype=torch.long)
        zin = scheduler.scale_model_input(z, t)
        out = guided_output(model_fn, zin, tt, text_emb, uncond_emb, guidance_scale, **model_kwargs)
        kwargs = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
        z = scheduler.step(out, t, z, **kwargs).prev_sample
    return z


@torch.no_grad()
def sample_images(
    base,
    model_fn: ModelFn,
    prompts: list[str],
    num_steps: int,
    *,
    sampler: str = "codi",
    num_grid: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    init_images: torch.Tensor | None = None,
    start_timestep: int | None = None,
    init_latents: torch.Tensor | None = None,
    size: int | tuple[int, int] | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Sample images ``[B, 3, H, W]`` in ``[0, 1]`` for ``prompts`` with ``model_fn``.

    ``size`` is the image size in pixels, ``H`` or ``(H, W)``: the run's resolution for a student
    (its conditions have that size); default the base's native resolution.

    ``model_kwargs`` (e.g. the condition ``features``) go to every ``model_fn`` call.
    ``init_images`` (``[B, 3, H, W]`` in ``[-1, 1]``, e.g. ``Condition.start_image``) with
    ``start_timestep`` start from those images noised to that timestep (see :func:`sample_latents`);
    ``init_latents`` (``[B, c, h, w]``) start from latents instead (not both).
    """
    if init_images is not None and init_latents is not None:
        raise ValueError("give init_images or init_latents to start from, not both")
    device = base.device
    text = base.encode_prompts(list(prompts))
    uncond = base.encode_prompts([""])
    scheduler = make_scheduler(base, sampler, num_grid=num_grid)
    height, width = _pixel_size(base, size)
    f = base.vae_scale_factor
    generator = torch_generator(seed)
    init = init_latents if init_images is None else base.encode_images(init_images.to(device))
    z = sample_latents(model_fn, scheduler, (len(prompts), base.latent_channels, height // f, width // f), text, uncond,
                       num_steps, guidance_scale=guidance_scale, generator=generator, device=device,
                       dtype=base.dtype, init_latents=init, start_timestep=start_timestep, **model_kwargs)
    return ((base.decode_latents(z).float() + 1) / 2).clamp(0, 1)


def _pixel_size(base, size) -> tuple[int, int]:
    """``(H, W)`` in pixels of ``size`` (``None``: the base's native resolution; an int: a square)."""
    if size is None:
        return base.resolution, base.resolution
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    f = base.vae_scale_factor
    if height < f or width < f or height % f or width % f:
        raise ValueError(f"cannot sample {height}x{width} px with this base: both sides must be positive multiples of "
                         f"its VAE factor {f}")
    return height, width
