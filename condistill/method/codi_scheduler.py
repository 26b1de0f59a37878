"""Few-step sampler of a distilled CoDi student as a real diffusers scheduler.

``CoDiScheduler`` plugs into stock diffusers pipelines (``StableDiffusionPipeline``,
``StableDiffusionControlNetPipeline``, ``StableDiffusionAdapterPipeline``, ...)::

    pipe.scheduler = CoDiScheduler.from_config(pipe.scheduler.config)   # keeps the teacher's betas
    image = pipe(prompt, image=control, num_inference_steps=4, guidance_scale=1.0).images[0]

Sampling uses K timesteps taken from the SAME N-point skip grid the student was distilled on
(:func:`condistill.method.schedule.skip_grid` / :func:`condistill.method.schedule.sampling_timesteps`).  At each
timestep ``t`` with model output ``out``::

    x0_est = F(z, t) = c_skip(t) z + c_out(t) x0_hat(out, z, t)
    last step:  return x0_est
    otherwise:  z <- a_next x0_est + s_next eps_hat         (deterministic, default)
                z <- a_next x0_est + s_next n,  n ~ N(0, I)  (stochastic=True, LCM-style)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .one_step import problems as one_step_problems
from .schedule import (
    BETA_SCHEDULES,
    alpha_sigma,
    consistency_function,
    make_alphas_cumprod,
    normalize_prediction_type,
    sampling_timesteps,
    skip_grid,
)

__all__ = ["CoDiScheduler", "CoDiSchedulerOutput"]


@dataclass
class CoDiSchedulerOutput(BaseOutput):
    """Output of :meth:`CoDiScheduler.step`.

    Attributes:
        prev_sample: ``[B, C, H, W]`` latent for the next timestep (``denoised`` on the last step).
        denoised: ``[B, C, H, W]`` the consistency estimate ``x0_est = F(z, t)`` of the clean latent.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class CoDiScheduler(SchedulerMixin, ConfigMixin):
    """Consistency sampler on the distillation skip grid (1-4 steps typical).

    Config (saved by ``save_pretrained`` / ``save_config``):
        num_train_timesteps, beta_start, beta_end, beta_schedule (``"linear"``, ``"scaled_linear"``,
        ``"squaredcos_cap_v2"``), trained_betas, rescale_betas_zero_snr: the teacher's noise schedule;
        prediction_type: the teacher's (``"epsilon"``, ``"v_prediction"``, ``"sample"``; aliases
        such as ``"v"`` or ``"vprediction"`` are normalised);
        num_grid: N, the training skip grid size (LCM's ``original_inference_steps``), default 50;
        sigma_data, timestep_scaling: the boundary scalings of ``F`` (0.5, 10.0);
        stochastic: re-noise with fresh Gaussian noise between steps instead of the predicted noise;
        one_step_start: where a one-step schedule starts (:mod:`condistill.method.one_step`), ``None``
        or ``{"timestep": s, "from": "noise" | "zero" | "input"}``: ``set_timesteps(1)`` gives ``[s]``,
        and for ``"zero"`` ``init_noise_sigma`` becomes ``s_s``, so a stock pipeline's pure-noise
        latents are the zero latent noised to ``s``; an ``"input"`` start is noised by an img2img
        pipeline's ``add_noise`` (``strength=1.0``).

    ``CoDiScheduler.from_config(teacher_pipe.scheduler.config)`` works from DDIM/PNDM/DDPM/LCM/Euler/...
    configs: their extra keys (``steps_offset``, ``clip_sample``, ``timestep_spacing``, ...) do not
    affect this sampler and are ignored.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["LCMScheduler", "TCDScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        num_grid: int = 50,
        sigma_data: float = 0.5,
        timestep_scaling: float = 10.0,
        stochastic: bool = False,
        rescale_betas_zero_snr: bool = False,
        one_step_start: dict | None = None,
    ):
        canonical = normalize_prediction_type(prediction_type)
        if canonical != prediction_type:
            self.register_to_config(prediction_type=canonical)
        if trained_betas is None and beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; use one of {list(BETA_SCHEDULES)}.")
        if rescale_betas_zero_snr and canonical == "epsilon":
            raise ValueError(
                "rescale_betas_zero_snr=True makes abar(T-1) = 0, where an epsilon-prediction model cannot "
                "recover x0. Use a 'v_prediction' teacher or set rescale_betas_zero_snr=False."
            )
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
        if not timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {timestep_scaling}.")
        self.alphas_cumprod = make_alphas_cumprod(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.alphas = torch.cat([self.alphas_cumprod[:1], self.alphas_cumprod[1:] / self.alphas_cumprod[:-1]])
        self.betas = 1.0 - self.alphas
        self.grid = skip_grid(num_train_timesteps, num_grid)
        bad = ([] if one_step_start is None or isinstance(one_step_start, dict) else
               ['must be null or {"timestep": <a grid timestep>, "from": "noise" | "zero" | "input"}'])
        bad = bad or one_step_problems(one_step_start, self.grid.tolist(), None)
        if bad:
            raise ValueError(f"one_step_start={one_step_start!r}: {'; '.join(bad)}.")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = self.grid.flip(0).clone()

    # ------------------------------------------------------------------ schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
        start_timestep: int | None = None,
    ) -> None:
        """Choose the K sampling timesteps (descending) on the training grid.

        ``timesteps = sampling_timesteps(skip_grid(T, N), K)`` (same as diffusers' LCMScheduler with
        ``original_inference_steps=N``), e.g. ``[999, 759, 499, 259]`` for K=4, N=50.  Custom
        ``timesteps`` must be strictly descending points of the grid.

        Args:
            num_inference_steps: K in ``1..num_grid``; exclusive with ``timesteps``.
            device: where ``self.timesteps`` lives.
            timesteps: optional explicit schedule, a descending subset of the grid.
            start_timestep: with ``num_inference_steps``, a grid point to start from instead of the
                top: the K steps are chosen the same way on the grid points up to it. Sampling then
                starts from an image noised to that timestep (``add_noise``), not from pure noise.
                Without it, one step starts where the config's ``one_step_start`` says.

        A schedule that starts at the recorded ``one_step_start`` of a ``"zero"`` start (the one-step default,
        or explicit ``timesteps`` or ``start_timestep`` beginning there) sets ``init_noise_sigma`` to its
        ``s_t``; every other schedule sets it to 1. An ``"input"`` start is only a start in an img2img
        pipeline (``strength=1.0`` noises ``image=`` to the first timestep); a text-to-image pipeline on
        this scheduler takes that one step from pure noise.
        """
        self.init_noise_sigma = 1.0
        one = self.config.one_step_start
        if one and num_inference_steps == 1 and start_timestep is None and timesteps is None:
            start_timestep = one["timestep"]
        first = start_timestep if timesteps is None else next(iter(timesteps), None)
        if one and one["from"] == "zero" and first is not None and int(first) == one["timestep"]:
            # a schedule from the recorded zero start: the stock pipelines' randn * init_noise_sigma is s_t eps
            self.init_noise_sigma = float(alpha_sigma(self.alphas_cumprod.cpu(), torch.tensor([int(first)]))[1])
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of num_inference_steps or timesteps to set_timesteps.")
        if start_timestep is not None and timesteps is not None:
            raise ValueError("start_timestep goes with num_inference_steps; explicit timesteps already say where to start.")
        if timesteps is not None:
            ts = torch.as_tensor(list(timesteps), dtype=torch.long).reshape(-1)
            if ts.numel() < 1:
                raise ValueError("timesteps must contain at least one value.")
            if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
                raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}.")
            off_grid = [int(v) for v in ts if not bool((self.grid == v).any())]
            if off_grid:
                raise ValueError(
                    f"timesteps {off_grid} are not on the training grid the student was distilled on "
                    f"(num_grid={self.config.num_grid}: {self.grid[:3].tolist()} ... {self.grid[-1].item()}); "
                    "use num_inference_steps or grid points only."
                )
        else:
            ts = sampling_timesteps(self.grid, num_inference_steps, start=start_timestep)
        self.num_inference_steps = int(ts.numel())
        self.timesteps = ts.to(device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity (VP latents need no input scaling): returns ``sample`` ``[B, C, H, W]`` unchanged."""
        return sample

    def _index_of(self, timestep: int | torch.Tensor) -> int:
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(
                    f"step expects one timestep for the whole batch, got a tensor of shape {tuple(timestep.shape)}."
                )
            timestep = timestep.item()
        value = int(timestep)
        matches = (self.timesteps.cpu() == value).nonzero()
        if matches.numel() == 0:
            raise ValueError(
                f"timestep {value} is not in the current schedule {self.timesteps.tolist()}; "
                "call set_timesteps first and step through scheduler.timesteps."
            )
        return int(matches[0, 0])

    # ---------------------------------------------------------------------- step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> CoDiSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One consistency step from ``timestep`` to the next timestep of the schedule.

        ``denoised = F(z, t) = c_skip(t) z + c_out(t) x0_hat``; on the last timestep ``prev_sample =
        denoised``, otherwise ``prev_sample = a_next denoised + s_next n`` with ``n = eps_hat``
        (deterministic) or ``n ~ N(0, I)`` drawn with ``generator`` (``stochastic=True``).

        Args:
            model_output: ``[B, C, H, W]`` student output in the teacher's prediction type.
            timestep: the current timestep (an element of ``self.timesteps``).
            sample: ``[B, C, H, W]`` current latent ``z_t``.
            generator: RNG for the stochastic mode.
            return_dict: return :class:`CoDiSchedulerOutput` (else ``(prev_sample, denoised)``).

        Returns:
            ``prev_sample`` and ``denoised``, both ``[B, C, H, W]`` in ``sample.dtype``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call set_timesteps(num_inference_steps) before step().")
        index = self._index_of(timestep)
        device = sample.device
        if self.alphas_cumprod.device != device:
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        t = torch.tensor([int(self.timesteps[index])], dtype=torch.long, device=device)
        out32, z32 = model_output.float(), sample.float()
        denoised, _, eps_hat = consistency_function(
            out32,
            z32,
            t,
            self.alphas_cumprod,
            self.config.prediction_type,
            self.config.sigma_data,
            self.config.timestep_scaling,
        )
        if index == len(self.timesteps) - 1:
            prev = denoised
        else:
            t_next = torch.tensor([int(self.timesteps[index + 1])], dtype=torch.long, device=device)
            a_next, s_next = alpha_sigma(self.alphas_cumprod, t_next, ndim=sample.ndim)
            if self.config.stochastic:
                noise = randn_tensor(sample.shape, generator=generator, device=device, dtype=torch.float32)
            else:
                noise = eps_hat
            prev = a_next * denoised + s_next * noise
        prev, denoised = prev.to(sample.dtype), denoised.to(sample.dtype)
        if not return_dict:
            return prev, denoised
        return CoDiSchedulerOutput(prev_sample=prev, denoised=denoised)

    # ---------------------------------------------------------------- utilities
    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int
    ) -> torch.Tensor:
        """Forward diffusion ``z_t = a_t z0 + s_t eps`` (img2img/inpaint pipelines).

        Args:
            original_samples: ``[B, C, H, W]``; noise: same shape; timesteps: ``[B]``, ``[1]`` or scalar.

        Returns:
            ``[B, C, H, W]`` in ``original_samples.dtype``.
        """
        if noise.shape != original_samples.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} must equal the sample shape {tuple(original_samples.shape)}."
            )
        device = original_samples.device
        t = torch.as_tensor(timesteps, device=device).to(torch.long).reshape(-1)
        a, s = alpha_sigma(self.alphas_cumprod.to(device), t, ndim=original_samples.ndim)
        return (a * original_samples.float() + s * noise.float()).to(original_samples.dtype)

    def __len__(self) -> int:
        """Number of training timesteps T."""
        return self.config.num_train_timesteps
