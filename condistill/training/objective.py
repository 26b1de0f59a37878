"""The per-step objective, built once from the configuration.

:func:`build_objective` reads the config a single time (codi or diffusion loss, guidance,
ODE source, distance, lambda) and returns ``objective(batch, micro_step) -> (loss [B], info)``.
Every random draw of micro-step ``i`` (caption dropout, noise, guidance scale, timestep or grid
index) comes from one generator seeded by ``(seed, i)`` (:mod:`condistill.seeding`), in a fixed
order, so a resumed run replays exactly what an uninterrupted one computes. The draws are made
for the *global* batch of all processes and each process keeps its own slice
(:class:`~condistill.training.batches.Part`), so ``N`` processes with batch ``B`` draw what one
process with batch ``N * B`` draws.

A batch holds ``pixel_values`` (encoded by the VAE here) or ``latents`` (``[B, c, h, w]``, exactly
what ``base.encode_images`` returns, scaled), and ``caption`` with, optionally, ``prompt_embeds``
(exactly what ``base.encode_prompts(caption)`` returns: a ``[B, ...]`` tensor or a dict of them).
Cached embeddings of items whose caption is dropped are replaced by the empty prompt's.
"""
from __future__ import annotations

from typing import Callable

import torch

from condistill.adapters.shared_pass import shared_frozen_blocks
from condistill.config import DistillConfig
from condistill.method.guidance import guided_output, make_model_fn
from condistill.method.losses import codi_loss, diffusion_loss, sample_grid_index
from condistill.method.schedule import skip_grid
from condistill.seeding import STEP_STRIDE, torch_generator
from condistill.training.batches import Part

__all__ = ["DTYPES", "Objective", "build_objective", "clean_latents", "prompt_embeddings", "step_generator"]

#: ``--mixed-precision`` -> dtype of the frozen base
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Objective = Callable[[dict, int], tuple[torch.Tensor, dict]]


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The generator of every random draw of ``micro_step``."""
    return torch_generator(seed, micro_step, STEP_STRIDE)


def build_objective(cfg: DistillConfig, student, model, ema, base, part: Part = Part()) -> Objective:
    """``objective(batch, micro_step)``: the per-sample loss ``[B]`` of one micro-batch and its diagnostics.

    Args:
        cfg: the run's configuration (read here, once).
        student: the :class:`~condistill.adapters.Student` (its EMA weights are swapped in for the
            target and ODE branches).
        model: the module that carries gradients (``student`` itself, or its accelerate wrapper).
        ema: the :class:`~condistill.training.ema.EMA` of the adapter parameters.
        base: the frozen :class:`~condistill.frozen.Base`.
        part: which slice of the global batch this process trains on (one process: all of it).
    """
    device = base.device
    alphas = base.alphas_cumprod.to(device)
    grid = skip_grid(base.num_train_timesteps, cfg.num_grid).to(device)
    uncond = base.encode_prompts([""])
    guided = cfg.guidance_enabled
    # guidance_branches="ode": only the ODE solver is guided, so the student learns to land on
    # the guided trajectory by itself and samples without CFG (like guided LCM distillation)
    guide_student = cfg.guidance_branches != "ode"

    def objective(batch: dict, micro_step: int):
        g = step_generator(cfg.seed, micro_step)
        with torch.no_grad():
            z0 = clean_latents(base, batch)
            b = z0.shape[0]
            n = part.global_size(b)  # every draw is made for the global batch, then sliced
            drop = part.take([bool(torch.rand((), generator=g) < cfg.caption_dropout) for _ in range(n)], b)
            emb = prompt_embeddings(base, batch, drop, uncond)
        noise = part.take(torch.randn((n, *z0.shape[1:]), generator=g), b).to(device)
        cond = batch["conditioning"].to(device)
        w = None
        if guided:
            w = part.take(cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(n, generator=g),
                          b).to(device)
        cache = {}

        def online(z, t, e):
            # encoded on first use: codi_loss runs the EMA branches first, and swapping EMA
            # weights in place would invalidate features computed from the online weights earlier
            if "features" not in cache:
                cache["features"] = student.encode_condition(cond)
            return make_model_fn(model, cache["features"], b)(z, t, e)

        if cfg.loss == "diffusion":
            t = part.take(torch.randint(0, alphas.shape[0], (n,), generator=g), b).to(device)
            return diffusion_loss(lambda z, tt: online(z, tt, emb), z0, noise, t, alphas, base.prediction_type), {}

        w_student = w if guide_student else None

        def ema_fn(z, t, scale=w_student):
            with ema.swapped_in(student), torch.no_grad():
                f = make_model_fn(student, student.encode_condition(cond), b)
                return guided_output(f, z, t, emb, uncond, scale)

        def teacher_fn(z, t):
            with torch.no_grad():
                return guided_output(make_model_fn(student, None, b, use_adapter=False), z, t, emb, uncond, w)

        k = part.take(sample_grid_index(n, cfg.num_grid, g), b).to(device)
        # the frozen blocks the online and ODE branches feed equal inputs run once (bit-identical)
        with shared_frozen_blocks(student.shared_frozen_blocks()):
            return codi_loss(
                lambda z, t: guided_output(online, z, t, emb, uncond, w_student), ema_fn,
                (lambda z, t: ema_fn(z, t, w)) if cfg.ode_source == "ema" else teacher_fn,
                z0, noise, k, grid, alphas, base.prediction_type,
                distance=cfg.distance, huber_c=cfg.huber_c, regression_weight=cfg.regression_weight,
            )

    return objective


@torch.no_grad()
def clean_latents(base, batch: dict) -> torch.Tensor:
    """``z0`` (float32, on the base's device): the batch's cached ``latents``, else its ``pixel_values`` encoded."""
    if "latents" in batch:
        return batch["latents"].to(base.device).float()
    if "pixel_values" not in batch:
        raise KeyError("a training batch needs 'pixel_values' (images in [-1, 1]) or 'latents' (cached VAE latents)")
    return base.encode_images(batch["pixel_values"].to(base.device, base.dtype)).float()


@torch.no_grad()
def prompt_embeddings(base, batch: dict, drop: list[bool], uncond):
    """The text embeddings of the batch, with the items marked in ``drop`` given the empty prompt's ``uncond``.

    Cached ``prompt_embeds`` (a ``[B, ...]`` tensor or a dict of them) are used when the batch has
    them; otherwise the captions are encoded (a dropped caption is encoded as ``""``).
    """
    cached = batch.get("prompt_embeds")
    if cached is None:
        return base.encode_prompts(["" if d else c for c, d in zip(batch["caption"], drop)])
    mask = torch.tensor(drop, dtype=torch.bool, device=base.device)

    def replace(value: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        value = value.to(device=base.device, dtype=empty.dtype)
        if value.shape[0] != len(drop) or value.shape[1:] != empty.shape[1:]:
            raise ValueError(f"cached prompt_embeds of shape {tuple(value.shape)} do not fit this base (its "
                             f"embeddings are [B, {', '.join(map(str, empty.shape[1:]))}]); rebuild the cache "
                             "with this base")
        return torch.where(mask.view(-1, *[1] * (value.ndim - 1)), empty, value)

    if isinstance(cached, dict):
        if not isinstance(uncond, dict) or set(cached) != set(uncond):
            raise ValueError(f"cached prompt_embeds hold {sorted(cached)}, but this base's embeddings hold "
                             f"{sorted(uncond) if isinstance(uncond, dict) else 'one tensor'}; rebuild the cache "
                             "with this base")
        return {key: replace(value, uncond[key]) for key, value in cached.items()}
    if isinstance(uncond, dict):
        raise ValueError(f"cached prompt_embeds are one tensor, but this base's embeddings hold {sorted(uncond)}; "
                         "rebuild the cache with this base")
    return replace(cached, uncond)
