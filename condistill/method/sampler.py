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


def make_scheduler(base, kind: str = "codi", *, num_grid: int = 50, stochastic: bool = False):
    """A scheduler on the base's noise schedule: ``codi`` (few-step), ``codi-stochastic`` (the
    same, re-noising with fresh noise between steps), ``ddim`` or ``lcm``."""
    config = dict(base.scheduler_config)
    if kind in ("codi", "codi-stochastic"):
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
    **model_kwargs,
) -> torch.Tensor:
    """Run ``num_steps`` of ``scheduler`` from pure noise.

    ``model_fn(z [B,4,h,w], t [B], text, **model_kwargs)`` returns the raw model output; ``text``
    is the text conditioning of ``base.encode_prompts`` (``[B, L, D]``, or SDXL's dict).
    ``guidance_scale > 1`` applies classifier-free guidance with the empty-prompt conditioning
    ``uncond_emb`` (batch 1 or B). Returns the final latents.
    """
    z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    z = z * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps, device=device)
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
    **model_kwargs,
) -> torch.Tensor:
    """Sample images ``[B, 3, H, W]`` in ``[0, 1]`` for ``prompts`` with ``model_fn``.

    ``model_kwargs`` (e.g. the condition ``features``) go to every ``model_fn`` call.
    """
    device = base.device
    text = base.encode_prompts(list(prompts))
    uncond = base.encode_prompts([""])
    scheduler = make_scheduler(base, sampler, num_grid=num_grid)
    h = base.resolution // base.vae_scale_factor
    generator = torch_generator(seed)
    z = sample_latents(model_fn, scheduler, (len(prompts), base.latent_channels, h, h), text, uncond,
                       num_steps, guidance_scale=guidance_scale, generator=generator, device=device,
                       dtype=base.dtype, **model_kwargs)
    return ((base.decode_latents(z).float() + 1) / 2).clamp(0, 1)
