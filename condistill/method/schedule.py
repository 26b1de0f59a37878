"""Pure tensor functions of the teacher's variance-preserving (VP) noise schedule.

Everything the training loss and the few-step scheduler share lives here, once:

* the noise schedule ``abar_t`` (``alphas_cumprod``) built exactly like diffusers' schedulers,
* the N-point *skip grid* the student is distilled on and the K sampling timesteps taken from it,
* ``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``,
* the conversion of a raw model output (epsilon / v / sample) into ``(x0_hat, eps_hat)``,
* the DDIM step ``z_s = a_s * x0_hat + s_s * eps_hat``,
* the consistency function ``F(z, t) = c_skip(t) * z + c_out(t) * x0_hat`` with the LCM
  boundary scalings.

Shapes: ``B`` is the batch size, latents are ``[B, C, H, W]``.  Per-sample schedule
coefficients are returned as ``[B, 1, 1, 1]`` (``ndim`` controls the number of trailing
singleton dimensions) so they broadcast against latents.  No function here changes state
or draws random numbers.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "PREDICTION_TYPES",
    "BETA_SCHEDULES",
    "normalize_prediction_type",
    "make_alphas_cumprod",
    "skip_grid",
    "sampling_timesteps",
    "alpha_sigma",
    "boundary_scalings",
    "split_prediction",
    "ddim_step",
    "consistency_function",
    "add_noise",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

_PREDICTION_ALIASES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "noise": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
    "vprediction": "v_prediction",
    "v-prediction": "v_prediction",
    "v_pred": "v_prediction",
    "velocity": "v_prediction",
    "sample": "sample",
    "x0": "sample",
    "x_0": "sample",
    "x_start": "sample",
}


def normalize_prediction_type(name: str) -> str:
    """Return the canonical diffusers name of a prediction type.

    Accepts the canonical names ``"epsilon"``, ``"v_prediction"``, ``"sample"`` and common
    aliases (case-insensitive, surrounding spaces ignored): ``"eps"``, ``"noise"``; ``"v"``,
    ``"vprediction"``, ``"v-prediction"``, ``"v_pred"``, ``"velocity"``; ``"x0"``, ``"x_0"``,
    ``"x_start"``.

    Args:
        name: the prediction type as written by the user or found in a scheduler config.

    Returns:
        One of ``"epsilon"``, ``"v_prediction"``, ``"sample"``.

    Raises:
        ValueError: for any other value, listing the accepted names.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"prediction_type must be a string, got {type(name).__name__} ({name!r}); "
            f"use one of {list(PREDICTION_TYPES)}."
        )
    key = name.strip().lower()
    if key not in _PREDICTION_ALIASES:
        raise ValueError(
            f"Unknown prediction_type {name!r}. Use one of {list(PREDICTION_TYPES)} "
            f"(aliases accepted: {sorted(k for k in _PREDICTION_ALIASES if k not in PREDICTION_TYPES)}). "
            "SD 1.x teachers are 'epsilon', SD 2.x 768px teachers are 'v_prediction'; the teacher's "
            "scheduler config records the right one."
        )
    return _PREDICTION_ALIASES[key]


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021), computed in float64, returned float32.

    ``abar(u) = cos^2((u + 0.008) / 1.008 * pi / 2)``, ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)``.
    """

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1): shift ``sqrt(abar)`` so its last value
    is 0, scale it so its first value is unchanged, and recover the betas."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    trained_betas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """Cumulative products ``abar_t = prod_{i<=t} (1 - beta_i)`` of a VP noise schedule.

    Built with the same float32 operations as diffusers' DDPM/DDIM/LCM schedulers for the same
    config, so the student is distilled and sampled with exactly the teacher's ``abar``.

    Args:
        num_train_timesteps: T, the number of discrete training timesteps.
        beta_start, beta_end: first and last beta for the (scaled) linear schedules.
        beta_schedule: ``"linear"`` (``beta = linspace(beta_start, beta_end, T)``),
            ``"scaled_linear"`` (``beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2``, Stable
            Diffusion) or ``"squaredcos_cap_v2"`` (cosine schedule).
        trained_betas: explicit betas ``[T]``; overrides ``beta_schedule`` when given.
        rescale_betas_zero_snr: rescale to zero terminal SNR (``abar_{T-1} = 0``).

    Returns:
        float32 tensor ``[T]``, decreasing, in ``(0, 1]`` (the last entry is 0 with zero-SNR rescaling).
    """
    if int(num_train_timesteps) < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
    T = int(num_train_timesteps)
    if trained_betas is not None:
        if isinstance(trained_betas, torch.Tensor):
            betas = trained_betas.detach().to(device="cpu", dtype=torch.float32).flatten()
        else:
            betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32).flatten()
        if betas.numel() != T:
            raise ValueError(
                f"trained_betas has {betas.numel()} entries but num_train_timesteps is {T}; "
                "pass one beta per training timestep."
            )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(T)
    else:
        raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; use one of {list(BETA_SCHEDULES)}.")
    if bool(((betas <= 0) | (betas >= 1)).any()):
        raise ValueError("Every beta must lie in (0, 1); check beta_start, beta_end or trained_betas.")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def skip_grid(num_train_timesteps: int = 1000, num_grid: int = 50) -> torch.Tensor:
    """The N-point skip grid the student is distilled on (LCM's "original" DDIM timesteps).

    ``grid[k] = (k + 1) * (T // N) - 1`` for ``k = 0..N-1``; for T=1000, N=50 this is
    19, 39, ..., 999.  Training uses the pair ``(grid[k], grid[k-1])``; sampling uses a subset
    of the same points (:func:`sampling_timesteps`).

    Args:
        num_train_timesteps: T.
        num_grid: N, the number of grid points (LCM's ``original_inference_steps``).

    Returns:
        LongTensor ``[N]``, strictly ascending, last entry ``T - 1``.

    Raises:
        ValueError: unless ``1 <= N <= T`` and N divides T (so the top of the grid is the last
            training timestep T-1, where sampling starts from pure noise).
    """
    T, N = int(num_train_timesteps), int(num_grid)
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
    if not 1 <= N <= T:
        raise ValueError(f"num_grid must be between 1 and num_train_timesteps={T}, got {num_grid}.")
    if T % N != 0:
        divisors = [d for d in range(1, T + 1) if T % d == 0]
        nearest = sorted(divisors, key=lambda d: (abs(d - N), d))[:3]
        raise ValueError(
            f"num_grid={N} does not divide num_train_timesteps={T}, so the grid would stop at "
            f"{N * (T // N) - 1} instead of {T - 1} where sampling starts from pure noise. "
            f"Choose a divisor of {T}, e.g. one of {sorted(nearest)}."
        )
    step = T // N
    return torch.arange(1, N + 1, dtype=torch.long) * step - 1


def sampling_timesteps(grid: torch.Tensor, num_steps: int, start: int | None = None) -> torch.Tensor:
    """The K sampling timesteps, a descending subset of the training grid starting at its top.

    Same choice as diffusers ``LCMScheduler.set_timesteps(K, original_inference_steps=N)``:
    with ``rev = grid`` reversed (descending), indices ``floor(linspace(0, N, K, endpoint=False))``
    (computed with numpy float64 exactly as diffusers does), i.e. about ``floor(i * N / K)``.
    For T=1000, N=50: K=1 -> [999]; K=2 -> [999, 499]; K=4 -> [999, 759, 499, 259].

    ``start`` (a grid point) starts the schedule there instead of at the top: the same choice is
    made on the grid points up to ``start``. That is the schedule of sampling from a noised
    image rather than from pure noise (:func:`condistill.method.sampler.sample_latents` with
    ``init_latents``): for N=50, K=1 and ``start=499`` it is ``[499]``; K=2 gives ``[499, 259]``.

    Args:
        grid: LongTensor ``[N]`` from :func:`skip_grid` (ascending).
        num_steps: K, between 1 and the number of grid points up to ``start``.
        start: optional first timestep, a point of ``grid`` (default: its top).

    Returns:
        LongTensor ``[K]``, strictly descending, every entry in ``grid``, first entry ``grid[-1]``
        (or ``start``).
    """
    grid = torch.as_tensor(grid)
    if grid.ndim != 1 or grid.numel() < 1:
        raise ValueError(f"grid must be a non-empty 1-D tensor of timesteps, got shape {tuple(grid.shape)}.")
    if start is not None:
        if isinstance(start, bool) or int(start) != start or not bool((grid == int(start)).any()):
            raise ValueError(
                f"start timestep {start!r} is not a point of the training grid ({grid[:3].tolist()} ... "
                f"{grid[-1].item()}, every {int(grid[1] - grid[0]) if grid.numel() > 1 else 1}); pick one of its points."
            )
        grid = grid[grid <= int(start)]
    N = grid.numel()
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= int(num_steps) <= N:
        raise ValueError(
            f"num_inference_steps must be an integer between 1 and the grid size {N}"
            f"{'' if start is None else f' (the points up to the start timestep {start})'}, got {num_steps!r}. "
            "The student is distilled for 1-4 steps; use a value in that range."
        )
    K = int(num_steps)
    descending = grid.flip(0)
    indices = np.floor(np.linspace(0, N, num=K, endpoint=False)).astype(np.int64)
    return descending[torch.from_numpy(indices).to(grid.device)].to(torch.long)


def _as_timestep_tensor(t: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as a 1-D LongTensor ``[B]`` (a python int or 0-d tensor becomes ``[1]``)."""
    if isinstance(t, torch.Tensor):
        if t.is_floating_point():
            if not bool((t == t.round()).all()):
                raise ValueError("timesteps must be integers (discrete training timesteps), got fractional values.")
        t = t.to(torch.long)
        return t.reshape(-1) if t.ndim == 0 else t
    if isinstance(t, (bool,)) or int(t) != t:
        raise ValueError(f"timestep must be an integer, got {t!r}.")
    return torch.tensor([int(t)], dtype=torch.long, device=device)


def alpha_sigma(
    alphas_cumprod: torch.Tensor, t: int | torch.Tensor, ndim: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise scales of the VP schedule: ``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``.

    Args:
        alphas_cumprod: ``[T]`` float tensor (``abar``).
        t: LongTensor ``[B]`` (or a python int / 0-d tensor, treated as ``B = 1``), values in ``[0, T)``.
        ndim: number of dimensions of the returned tensors (4 for image latents).

    Returns:
        ``(a_t, s_t)``, each ``[B, 1, ..., 1]`` with ``ndim`` dimensions, dtype of ``alphas_cumprod``,
        on the device of ``t`` when ``t`` is a tensor (else of ``alphas_cumprod``).
    """
    device = t.device if isinstance(t, torch.Tensor) else alphas_cumprod.device
    idx = _as_timestep_tensor(t, device)
    if idx.ndim != 1:
        raise ValueError(f"t must be a scalar or a 1-D tensor [B], got shape {tuple(idx.shape)}.")
    T = alphas_cumprod.shape[0]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= T):
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got values from {int(idx.min())} to {int(idx.max())}.")
    abar = alphas_cumprod.to(idx.device)[idx]
    shape = (-1,) + (1,) * (ndim - 1)
    return abar.sqrt().reshape(shape), (1.0 - abar).sqrt().reshape(shape)


def boundary_scalings(
    t: int | torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0, ndim: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary-condition scalings of the consistency function.

    With ``u = t * timestep_scaling``::

        c_skip(t) = sigma_data^2 / (u^2 + sigma_data^2)
        c_out(t)  = u / sqrt(u^2 + sigma_data^2)

    so ``c_skip(0) = 1, c_out(0) = 0`` (``F(z, 0) = z``).  Computed in float32 with the same
    operations as diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete`` applied
    to a LongTensor timestep (bit-identical to it).

    Args:
        t: LongTensor ``[B]`` or a python int.
        sigma_data: data standard deviation in the scalings (0.5).
        timestep_scaling: factor applied to the discrete timestep (10.0).

    Returns:
        ``(c_skip, c_out)``, float32, each ``[B, 1, ..., 1]`` with ``ndim`` dimensions.
    """
    device = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
    idx = _as_timestep_tensor(t, device)
    scaled = idx * timestep_scaling
    if not scaled.is_floating_point():
        scaled = scaled.to(torch.float32)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    shape = (-1,) + (1,) * (ndim - 1)
    return c_skip.reshape(shape), c_out.reshape(shape)


def split_prediction(
    model_output: torch.Tensor,
    z: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a raw model output into the clean-sample and noise estimates ``(x0_hat, eps_hat)``.

    With ``z = a * x0 + s * eps``:

    * epsilon: ``eps_hat = out``,              ``x0_hat = (z - s * eps_hat) / a``
    * v:       ``x0_hat = a * z - s * v``,      ``eps_hat = a * v + s * z``  (``v = a * eps - s * x0``)
    * sample:  ``x0_hat = out``,               ``eps_hat = (z - a * x0_hat) / s``

    Args:
        model_output: ``[B, C, H, W]`` raw output in the teacher's prediction type.
        z: ``[B, C, H, W]`` noisy latent.
        a, s: ``[B, 1, 1, 1]`` (or broadcastable) from :func:`alpha_sigma`.
        prediction_type: any name accepted by :func:`normalize_prediction_type`.

    Returns:
        ``(x0_hat, eps_hat)``, each ``[B, C, H, W]`` (dtype promoted with ``a`` and ``s``).
        epsilon needs ``a > 0`` (not usable at a zero-SNR terminal step).
    """
    kind = normalize_prediction_type(prediction_type)
    if model_output.shape != z.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} differs from the sample shape {tuple(z.shape)}; "
            "the model must predict one value per latent element."
        )
    if kind == "epsilon":
        eps_hat = model_output
        x0_hat = (z - s * eps_hat) / a
    elif kind == "v_prediction":
        x0_hat = a * z - s * model_output
        eps_hat = a * model_output + s * z
    else:
        x0_hat = model_output
        eps_hat = (z - a * x0_hat) / s
    return x0_hat, eps_hat


def ddim_step(
    x0_hat: torch.Tensor, eps_hat: torch.Tensor, a_prev: torch.Tensor, s_prev: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) update to a lower noise level: ``z_prev = a_prev * x0_hat + s_prev * eps_hat``.

    Args:
        x0_hat, eps_hat: ``[B, C, H, W]``.
        a_prev, s_prev: ``[B, 1, 1, 1]`` scales of the target timestep.

    Returns:
        ``z_prev`` ``[B, C, H, W]``.
    """
    return a_prev * x0_hat + s_prev * eps_hat


def consistency_function(
    model_output: torch.Tensor,
    z: torch.Tensor,
    t: int | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The consistency function of the student, ``F(z, t) = c_skip(t) * z + c_out(t) * x0_hat(z, t)``.

    Args:
        model_output: ``[B, C, H, W]`` raw model output at ``(z, t)``.
        z: ``[B, C, H, W]`` noisy latent at timestep ``t``.
        t: LongTensor ``[B]`` or python int.
        alphas_cumprod: ``[T]``.
        prediction_type: teacher's prediction type (aliases accepted).
        sigma_data, timestep_scaling: boundary-scaling constants (:func:`boundary_scalings`).

    Returns:
        ``(F, x0_hat, eps_hat)``, each ``[B, C, H, W]`` (float32 or wider).
    """
    ndim = z.ndim
    a, s = alpha_sigma(alphas_cumprod, t, ndim=ndim)
    a, s = a.to(z.device), s.to(z.device)
    x0_hat, eps_hat = split_prediction(model_output, z, a, s, prediction_type)
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling, ndim=ndim)
    c_skip, c_out = c_skip.to(z.device), c_out.to(z.device)
    return c_skip * z + c_out * x0_hat, x0_hat, eps_hat


def add_noise(
    z0: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion ``z_t = a_t * z0 + s_t * eps``.

    Args:
        z0: ``[B, C, H, W]`` clean latents.
        eps: ``[B, C, H, W]`` standard normal noise.
        t: LongTensor ``[B]`` (or a python int applied to every sample).
        alphas_cumprod: ``[T]``.

    Returns:
        ``z_t`` ``[B, C, H, W]`` in the dtype of ``z0`` (computed in at least float32).
    """
    if eps.shape != z0.shape:
        raise ValueError(f"noise shape {tuple(eps.shape)} must equal the latent shape {tuple(z0.shape)}.")
    a, s = alpha_sigma(alphas_cumprod, t, ndim=z0.ndim)
    a, s = a.to(z0.device), s.to(z0.device)
    return (a * z0 + s * eps).to(z0.dtype)
