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

import contextlib
from typing import Callable

import torch

from condistill.adapters.shared_pass import shared_frozen_blocks
from condistill.config import DistillConfig
from condistill.method.distribution_matching import dmd_loss, dmd_timesteps, gan_generator_loss
from condistill.method.guidance import guided_output, make_model_fn, repeat_batch
from condistill.method.losses import codi_loss, diffusion_loss, sample_grid_index
from condistill.method.sampler import start_latents
from condistill.method.schedule import add_noise, alpha_sigma, consistency_function, sampling_timesteps, skip_grid
from condistill.seeding import STEP_STRIDE, torch_generator
from condistill.training.batches import Part

__all__ = ["DTYPES", "Objective", "build_objective", "clean_latents", "prompt_embeddings", "step_generator"]

#: ``--mixed-precision`` -> dtype of the frozen base
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Objective = Callable[[dict, int], tuple[torch.Tensor, dict]]


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The generator of every random draw of ``micro_step``."""
    return torch_generator(seed, micro_step, STEP_STRIDE)


def build_objective(cfg: DistillConfig, student, model, ema, base, part: Part = Part(), fake_score=None,
                    condition=None) -> Objective:
    """``objective(batch, micro_step)``: the per-sample loss ``[B]`` of one micro-batch and its diagnostics.

    Args:
        cfg: the run's configuration (read here, once).
        student: the :class:`~condistill.adapters.Student` (its EMA weights are swapped in for the
            target and ODE branches).
        model: the module that carries gradients (``student`` itself, or its accelerate wrapper).
        ema: the :class:`~condistill.training.ema.EMA` of the adapter parameters.
        base: the frozen :class:`~condistill.frozen.Base`.
        part: which slice of the global batch this process trains on (one process: all of it).
        fake_score: the :class:`~condistill.training.fake_score.FakeScore` of the distribution-matching
            losses (``codi+dmd``, ``dmd``); trained here, once per micro-step, ``cfg.dmd_fake_updates`` times.
        condition: the run's :class:`~condistill.conditions.Condition`; needed only with
            ``cfg.dmd_start_timestep`` (its ``start_image`` is where the one-step outputs start).
    """
    if cfg.distribution_matching and fake_score is None:
        raise ValueError(f"loss={cfg.loss!r} needs its fake-score network: pass fake_score=FakeScore(...)")
    device = base.device
    alphas = base.alphas_cumprod.to(device)
    grid = skip_grid(base.num_train_timesteps, cfg.num_grid).to(device)
    t_one_step = _one_step_timestep(cfg, grid, condition)
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
            # encoded once, on first use, from the online weights (the diffusion loss, the
            # one-step outputs of distribution matching and the online branch share them)
            if "features" not in cache:
                cache["features"] = student.encode_condition(cond)
            return make_model_fn(model, cache["features"], b)(z, t, e)

        if cfg.loss == "diffusion":
            t = part.take(torch.randint(0, alphas.shape[0], (n,), generator=g), b).to(device)
            return diffusion_loss(lambda z, tt: online(z, tt, emb), z0, noise, t, alphas, base.prediction_type), {}

        w_student = w if guide_student else None

        # the EMA tensors are bound in place of the parameter objects, not copied into the
        # weights: nothing is copied per branch (at SD size a copy of the adapter is gigabytes),
        # and a graph built from the online weights stays valid (the online ODE runs it first)
        def ema_fn(z, t, scale=w_student):
            with ema.bound(student), torch.no_grad():
                f = make_model_fn(student, student.encode_condition(cond), b)
                return guided_output(f, z, t, emb, uncond, scale)

        def teacher_fn(z, t):
            with torch.no_grad():
                return guided_output(make_model_fn(student, None, b, use_adapter=False), z, t, emb, uncond, w)

        ode_fn = {"ema": lambda z, t: ema_fn(z, t, w), "teacher": teacher_fn, "online": None}[cfg.ode_source]
        k = part.take(sample_grid_index(n, cfg.num_grid, g, top_fraction=cfg.grid_top_fraction), b).to(device)
        online_fn = lambda z, t: guided_output(online, z, t, emb, uncond, w_student)  # noqa: E731
        matching = None
        if cfg.distribution_matching:
            z_one = part.take(torch.randn((n, *z0.shape[1:]), generator=g), b).to(device)
            t_start = t_one_step
            if cfg.dmd_start_timestep:  # from the condition's own image (or the zero latent), noised to t_one_step
                z_one = add_noise(start_latents(base, condition, cond), z_one,
                                  torch.full((b,), t_one_step, device=device), alphas)
            elif cfg.dmd_backward_steps:
                z_one, t_start = backward_simulation(cfg, student, cond, emb, uncond, w_student, z_one, grid, alphas,
                                                     g, part, base.prediction_type)
            matching = OneStepOutputs(online, emb, uncond, w_student, t_start, b, z_one)
            online_fn = matching.online_fn
        # the frozen blocks the online and ODE branches feed equal inputs run once (bit-identical)
        with (fake_score.frozen() if fake_score is not None else contextlib.nullcontext()), \
                shared_frozen_blocks(student.shared_frozen_blocks()):
            loss, info = codi_loss(
                online_fn, ema_fn, ode_fn,
                z0, noise, k, grid, alphas, base.prediction_type, distance=cfg.distance, huber_c=cfg.huber_c,
                regression_weight=cfg.regression_weight, consistency_weight=0.0 if cfg.loss == "dmd" else 1.0,
            )
        if matching is None:
            return loss, info
        x = matching.sample(alphas, base.prediction_type)
        info.update(_train_fake_score(cfg, fake_score, x, z0, emb, g, part, alphas.shape[0]))
        # the real score (the teacher with CFG) and the fake score on the same noised sample and timestep
        t_dmd = part.take(dmd_timesteps(n, alphas.shape[0], generator=g), b).to(device)
        noise_dmd = part.take(torch.randn((n, *z0.shape[1:]), generator=g), b).to(device)
        with fake_score.frozen():
            # one pass of the frozen weights: the teacher with CFG (the real score) and the fake score's LoRA rows
            term, extra = dmd_loss(x, fake_score.scores(emb, uncond, cfg.dmd_guidance), noise_dmd, t_dmd, alphas,
                                   base.prediction_type)
            info.update(dmd=term.detach(), **extra)
            loss = loss + cfg.dmd_weight * term
            if cfg.gan_weight > 0:  # the generator side of the adversarial term (no update of the head here)
                x_t = add_noise(x.float(), noise_dmd, t_dmd, alphas)
                gan = gan_generator_loss(fake_score.logits(x_t, t_dmd, emb))
                info["gan_g"] = gan.detach()
                loss = loss + cfg.gan_weight * gan
        return loss, info

    return objective


def _one_step_timestep(cfg: DistillConfig, grid: torch.Tensor, condition) -> int:
    """Where distribution matching's one-step outputs start: the grid's top, or ``cfg.dmd_start_timestep``."""
    if not cfg.dmd_start_timestep:
        return int(grid[-1])
    start = int(sampling_timesteps(grid.cpu(), 1, start=cfg.dmd_start_timestep)[0])  # refuses a non-grid point
    if condition is None:
        raise ValueError(f"dmd_start_timestep={start} starts the one-step outputs from the condition's image: pass "
                         "build_objective(..., condition=the run's condition)")
    return start


class OneStepOutputs:
    """The student's one-step outputs ``x = F(z_s, s)``, in the online branch's call.

    Distribution matching acts on what one-step sampling produces: the student at the top of the
    grid on pure noise (``z_s`` = fresh noise, ``s`` = the grid's top), or on the condition's own
    image (the zero latent for edge and depth) noised to ``s`` (``dmd_start_timestep``, sampling
    from the input; :func:`~condistill.method.sampler.start_latents`). That forward joins the
    online branch's batch (``[z_t, z_s]``, one call), so a data-parallel model still runs one
    forward per backward.
    """

    def __init__(self, online, emb, uncond, w, t_top, batch: int, z_top: torch.Tensor):
        self.online, self.emb, self.uncond, self.w, self.b = online, emb, uncond, w, batch
        self.z_top = z_top
        self.t_top = torch.full((batch,), int(t_top), dtype=torch.long, device=z_top.device)
        self.raw = None

    def online_fn(self, z, t):
        emb = repeat_batch(self.emb, 2, self.b, "emb")
        w = None if self.w is None else torch.cat([self.w, self.w])
        out = guided_output(self.online, torch.cat([z, self.z_top.to(z.dtype)]), torch.cat([t, self.t_top]), emb,
                            self.uncond, w)
        self.raw = out[self.b:]
        return out[:self.b]

    def sample(self, alphas, prediction_type: str) -> torch.Tensor:
        """``[B, C, h, w]`` one-step outputs, with the graph to the adapter."""
        if self.raw is None:
            raise RuntimeError("the online branch did not run")
        x, _, _ = consistency_function(self.raw, self.z_top, self.t_top, alphas, prediction_type)
        return x


@torch.no_grad()
def backward_simulation(cfg: DistillConfig, student, cond, emb, uncond, w, z: torch.Tensor, grid: torch.Tensor,
                        alphas: torch.Tensor, g: torch.Generator, part: Part, prediction_type: str
                        ) -> tuple[torch.Tensor, int]:
    """DMD2's backward simulation: ``(z_k, t_k)``, where the student's own K-step sampler (``cfg.dmd_backward_steps``)
    stands after ``k`` of its steps from the noise ``z`` (``k`` drawn uniformly from ``0..K-1`` for the batch).

    The steps run the current student without a graph, as sampling does (re-noised with fresh draws when
    ``cfg.stochastic_sampling``, else with the predicted noise); the caller's graph-carrying forward at
    ``(z_k, t_k)`` is then one of the K-step sampler's own steps, the outputs distribution matching acts on.
    """
    ts = sampling_timesteps(grid.cpu(), cfg.dmd_backward_steps).tolist()
    k = int(torch.randint(0, len(ts), (), generator=g))
    b, n = z.shape[0], part.global_size(z.shape[0])
    fn = make_model_fn(student, student.encode_condition(cond), b)
    for j in range(k):
        t = torch.full((b,), ts[j], dtype=torch.long, device=z.device)
        raw = guided_output(fn, z, t, emb, uncond, w)
        x0, _, eps = consistency_function(raw.float(), z.float(), t, alphas, prediction_type)
        fresh = part.take(torch.randn((n, *z.shape[1:]), generator=g), b).to(z.device)
        a_next, s_next = alpha_sigma(alphas, torch.full((b,), ts[j + 1], dtype=torch.long, device=z.device), ndim=z.ndim)
        z = a_next * x0 + s_next * (fresh if cfg.stochastic_sampling else eps)
    return z, ts[k]


def _train_fake_score(cfg: DistillConfig, fake_score, x, z0, emb, g, part: Part, num_timesteps: int) -> dict:
    """``cfg.dmd_fake_updates`` steps of the fake score on the detached one-step outputs ``x``."""
    b, n = x.shape[0], part.global_size(x.shape[0])
    records = []
    for _ in range(cfg.dmd_fake_updates):
        noise = part.take(torch.randn((n, *x.shape[1:]), generator=g), b).to(x.device)
        t = part.take(torch.randint(0, num_timesteps, (n,), generator=g), b).to(x.device)
        gan = {}
        if fake_score.head is not None:
            gan = dict(real=z0, gan_noise=part.take(torch.randn((n, *x.shape[1:]), generator=g), b).to(x.device),
                       gan_t=part.take(dmd_timesteps(n, num_timesteps, generator=g), b).to(x.device))
        records.append(fake_score.update(x, emb, noise, t, **gan))
    return {key: records[-1][key] for key in records[-1]}


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
