"""The per-step objective, built once from the configuration.

:func:`build_objective` reads the config a single time (codi or diffusion loss, guidance,
ODE source, distance, lambda) and returns ``objective(batch, micro_step) -> (loss [B], info)``.
Every random draw of micro-step ``i`` (caption dropout, noise, guidance scale, timestep or grid
index) comes from one generator seeded by ``(seed, i)`` (:mod:`condistill.seeding`), in a fixed
order, so a resumed run replays exactly what an uninterrupted one computes.
"""
from __future__ import annotations

from typing import Callable

import torch

from condistill.config import DistillConfig
from condistill.method.guidance import guided_output, make_model_fn
from condistill.method.losses import codi_loss, diffusion_loss, sample_grid_index
from condistill.method.schedule import skip_grid
from condistill.seeding import STEP_STRIDE, torch_generator

__all__ = ["DTYPES", "Objective", "build_objective", "step_generator"]

#: ``--mixed-precision`` -> dtype of the frozen base
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Objective = Callable[[dict, int], tuple[torch.Tensor, dict]]


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The generator of every random draw of ``micro_step``."""
    return torch_generator(seed, micro_step, STEP_STRIDE)


def build_objective(cfg: DistillConfig, student, model, ema, base) -> Objective:
    """``objective(batch, micro_step)``: the per-sample loss ``[B]`` of one micro-batch and its diagnostics.

    Args:
        cfg: the run's configuration (read here, once).
        student: the :class:`~condistill.adapters.Student` (its EMA weights are swapped in for the
            target and ODE branches).
        model: the module that carries gradients (``student`` itself, or its accelerate wrapper).
        ema: the :class:`~condistill.training.ema.EMA` of the adapter parameters.
        base: the frozen :class:`~condistill.frozen.Base`.
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
            z0 = base.encode_images(batch["pixel_values"].to(device, base.dtype)).float()
            captions = ["" if torch.rand((), generator=g) < cfg.caption_dropout else c for c in batch["caption"]]
            emb = base.encode_prompts(captions)
        b = z0.shape[0]
        noise = torch.randn(z0.shape, generator=g).to(device)
        cond = batch["conditioning"].to(device)
        w = None
        if guided:
            w = (cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, generator=g)).to(device)
        cache = {}

        def online(z, t, e):
            # encoded on first use: codi_loss runs the EMA branches first, and swapping EMA
            # weights in place would invalidate features computed from the online weights earlier
            if "features" not in cache:
                cache["features"] = student.encode_condition(cond)
            return make_model_fn(model, cache["features"], b)(z, t, e)

        if cfg.loss == "diffusion":
            t = torch.randint(0, alphas.shape[0], (b,), generator=g).to(device)
            return diffusion_loss(lambda z, tt: online(z, tt, emb), z0, noise, t, alphas, base.prediction_type), {}

        w_student = w if guide_student else None

        def ema_fn(z, t, scale=w_student):
            with ema.swapped_in(student), torch.no_grad():
                f = make_model_fn(student, student.encode_condition(cond), b)
                return guided_output(f, z, t, emb, uncond, scale)

        def teacher_fn(z, t):
            with torch.no_grad():
                return guided_output(make_model_fn(student, None, b, use_adapter=False), z, t, emb, uncond, w)

        k = sample_grid_index(b, cfg.num_grid, g).to(device)
        return codi_loss(
            lambda z, t: guided_output(online, z, t, emb, uncond, w_student), ema_fn,
            (lambda z, t: ema_fn(z, t, w)) if cfg.ode_source == "ema" else teacher_fn,
            z0, noise, k, grid, alphas, base.prediction_type,
            distance=cfg.distance, huber_c=cfg.huber_c, regression_weight=cfg.regression_weight,
        )

    return objective
