"""Pure losses of single-stage conditional distillation (CoDi, Mei et al. CVPR 2024).

Models enter only as callables ``fn(z, t) -> raw model output`` in the teacher's prediction
type: the caller closes over conditioning, guidance and which weights (online, EMA, frozen
teacher) each branch uses.  Every loss returns one value per sample (``[B]``); the caller
reduces.

One CoDi training step (DESIGN.md section 1), with ``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``
and the consistency function ``F(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t)``::

    k ~ U{1..N-1},  t = grid[k],  s = grid[k-1],  z_t = a_t z0 + s_t eps
    (x0, eps_hat) = ode_fn(z_t, t)                        # no grad
    z_s    = a_s x0 + s_s eps_hat                         # one DDIM step
    target = F_target(z_s, s)                             # no grad
    online = F_theta(z_t, t)                              # with grad
    loss   = d(online, sg(target)) + lambda * ||online - z0||^2

With ``ode_fn=None`` the one-step ODE takes the online branch's own raw output at ``(z_t, t)``,
detached, in place of a separate no-grad forward: one network call fewer per step.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import add_noise, alpha_sigma, consistency_function, normalize_prediction_type, split_prediction

__all__ = [
    "DISTANCES",
    "distance",
    "sample_grid_index",
    "codi_loss",
    "diffusion_loss",
]

DISTANCES = ("l2", "huber")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """Per-sample distance between two batches.

    With ``m = mean over non-batch dims of (pred - target)^2`` (the per-sample mean squared error,
    so ``sqrt(m)`` is the per-sample RMS difference ``d``):

    * ``"l2"``:    ``m``
    * ``"huber"``: ``sqrt(m + c^2) - c = sqrt(d^2 + c^2) - c`` (pseudo-Huber of the RMS, Song &
      Dhariwal 2023).  It behaves like ``d^2 / (2c)`` for ``d << c`` and like ``d`` for ``d >> c``;
      because ``d`` is an RMS (not an L2 norm) ``c`` does not depend on the latent size.  Computed
      without a square root of ``m`` alone, so the gradient is finite at ``pred == target``.

    Args:
        pred, target: ``[B, ...]`` of equal shape.
        kind: ``"l2"`` or ``"huber"``.
        huber_c: ``c > 0`` of the pseudo-Huber distance.

    Returns:
        ``[B]`` float32 (or wider) tensor.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}.")
    if pred.ndim < 1:
        raise ValueError("distance needs batched tensors [B, ...]; got a 0-d tensor.")
    diff = pred.float() - target.float()
    m = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
    if kind == "l2":
        return m
    if kind == "huber":
        if not huber_c > 0:
            raise ValueError(f"huber_c must be > 0, got {huber_c}; the default is 0.001.")
        return torch.sqrt(m + huber_c**2) - huber_c
    raise ValueError(f"Unknown distance {kind!r}; use one of {list(DISTANCES)}.")


_distance = distance  # codi_loss has a keyword argument named ``distance``


def sample_grid_index(
    batch: int, num_grid: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
    top_fraction: float = 0.0,
) -> torch.Tensor:
    """Draw grid indices ``k ~ U{1, ..., N-1}`` (k >= 1 so that ``grid[k-1]`` exists).

    With ``top_fraction = p > 0`` each index is instead the top of the grid, ``N - 1`` (where
    one-step sampling starts), with probability ``p``, else uniform as above: the top then gets
    ``p + (1 - p) / (N - 1)`` of the samples. ``p = 0`` draws exactly what it always did (same
    random stream).

    Args:
        batch: B.
        num_grid: N >= 2.
        generator: optional ``torch.Generator`` for reproducible draws (its device is used).
        device: where to put the result (defaults to the generator's device, else CPU).
        top_fraction: p in ``[0, 1]``.

    Returns:
        LongTensor ``[B]``.
    """
    if int(num_grid) < 2:
        raise ValueError(f"num_grid must be >= 2 to form (t, s) pairs on the grid, got {num_grid}.")
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}.")
    if not 0.0 <= float(top_fraction) <= 1.0:
        raise ValueError(f"top_fraction must be in [0, 1], got {top_fraction}.")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    k = torch.randint(1, int(num_grid), (int(batch),), generator=generator, device=gen_device)
    if top_fraction > 0:
        top = torch.rand((int(batch),), generator=generator, device=gen_device) < float(top_fraction)
        k = torch.where(top, torch.full_like(k, int(num_grid) - 1), k)
    return k.to(device) if device is not None else k


def codi_loss(
    online_fn: ModelFn,
    target_fn: ModelFn,
    ode_fn: ModelFn | None,
    z0: torch.Tensor,
    noise: torch.Tensor,
    grid_index: torch.Tensor,
    grid: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    *,
    distance: str = "l2",
    huber_c: float = 0.001,
    regression_weight: float = 1.0,
    consistency_weight: float = 1.0,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample CoDi loss (DESIGN.md section 1, steps 1-5).

    ::

        t = grid[k], s = grid[k-1],  z_t = a_t z0 + s_t eps                          (1)
        no grad: (x0, eps_hat) <- ode_fn(z_t, t);  z_s = a_s x0 + s_s eps_hat           (2)
        no grad: target = F(target_fn(z_s, s); z_s, s)                                   (3)
        online = F(online_fn(z_t, t); z_t, t)                                            (4)
        loss = d(online, sg(target)) + lambda * mean((online - z0)^2)                    (5)

    ``F(out; z, t) = c_skip(t) z + c_out(t) x0_hat(out, z, t)``.  ``ode_fn`` is the EMA conditional
    student (the paper's default) or the frozen teacher; ``target_fn`` is the EMA student.  Both run
    under ``torch.no_grad()``; only ``online_fn`` carries gradients.  ``ode_fn=None`` solves the ODE
    step from ``online_fn``'s output, detached; ``online_fn`` then runs before ``target_fn``, so the
    target branch must not write the online weights in place (the graph is still alive).

    Args:
        online_fn, target_fn, ode_fn: ``fn(z [B,C,H,W], t LongTensor [B]) -> [B,C,H,W]`` raw output
            in the teacher's prediction type (guidance and conditioning already applied).
        z0: ``[B, C, H, W]`` clean latents.
        noise: ``[B, C, H, W]`` standard normal noise.
        grid_index: LongTensor ``[B]``, values in ``[1, N-1]`` (:func:`sample_grid_index`).
        grid: LongTensor ``[N]`` from :func:`condistill.method.schedule.skip_grid`.
        alphas_cumprod: ``[T]`` teacher ``abar``.
        prediction_type: teacher's prediction type (aliases accepted).
        distance: ``"l2"`` or ``"huber"`` (see :func:`distance`).
        huber_c: pseudo-Huber constant.
        regression_weight: ``lambda`` of the conditional regression term (0 disables it).
        consistency_weight: weight of the consistency term ``d(online, sg(target))``; 0 drops it
            (the ODE and target branches are then not run and ``"distill"`` is zero).
        sigma_data, timestep_scaling: boundary-scaling constants.

    Returns:
        ``(loss [B], info)`` with ``info`` holding detached ``[B]`` tensors: ``"distill"``,
        ``"regression"``, ``"t"``, ``"s"``.
    """
    kind = normalize_prediction_type(prediction_type)
    if z0.shape != noise.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal the latent shape {tuple(z0.shape)}.")
    grid = torch.as_tensor(grid).to(z0.device)
    k = torch.as_tensor(grid_index).to(device=z0.device, dtype=torch.long)
    if k.ndim != 1 or k.shape[0] != z0.shape[0]:
        raise ValueError(f"grid_index must be a LongTensor [B] with B={z0.shape[0]}, got shape {tuple(k.shape)}.")
    if bool(((k < 1) | (k >= grid.numel())).any()):
        raise ValueError(
            f"grid_index values must lie in [1, {grid.numel() - 1}] (k >= 1 so that s = grid[k-1] exists); "
            "draw them with sample_grid_index."
        )
    if regression_weight < 0:
        raise ValueError(f"regression_weight must be >= 0, got {regression_weight}.")
    if consistency_weight < 0:
        raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}.")
    t, s = grid[k], grid[k - 1]
    z_t = add_noise(z0, noise, t, alphas_cumprod)
    target = None
    raw_online = online_fn(z_t, t) if ode_fn is None else None
    with torch.no_grad():
        if consistency_weight > 0:
            a_t, s_t = alpha_sigma(alphas_cumprod, t, ndim=z0.ndim)
            raw_ode = raw_online.detach() if ode_fn is None else ode_fn(z_t, t)
            x0_ode, eps_ode = split_prediction(raw_ode, z_t, a_t, s_t, kind)
            a_s, s_s = alpha_sigma(alphas_cumprod, s, ndim=z0.ndim)
            z_s = (a_s * x0_ode + s_s * eps_ode).to(z0.dtype)
            target, _, _ = consistency_function(
                target_fn(z_s, s), z_s, s, alphas_cumprod, kind, sigma_data, timestep_scaling
            )
    if raw_online is None:
        raw_online = online_fn(z_t, t)
    online, _, _ = consistency_function(raw_online, z_t, t, alphas_cumprod, kind, sigma_data, timestep_scaling)
    regression = _distance(online, z0, "l2")
    if target is None:
        distill = torch.zeros_like(regression)
    else:
        distill = _distance(online, target.detach(), distance, huber_c)
    loss = consistency_weight * distill + regression_weight * regression
    info = {"distill": distill.detach(), "regression": regression.detach(), "t": t, "s": s}
    return loss, info


def diffusion_loss(
    model_fn: ModelFn,
    z0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Conventional denoising loss of the baselines: ``mean((model_fn(z_t, t) - target)^2)`` per sample.

    ``z_t = a_t z0 + s_t eps``; target ``eps`` (epsilon), ``v = a_t eps - s_t z0`` (v_prediction) or
    ``z0`` (sample).

    Args:
        model_fn: ``fn(z [B,C,H,W], t [B]) -> [B,C,H,W]``.
        z0, noise: ``[B, C, H, W]``.
        t: LongTensor ``[B]`` of training timesteps in ``[0, T)``.
        alphas_cumprod: ``[T]``.
        prediction_type: the model's prediction type (aliases accepted).

    Returns:
        ``[B]`` per-sample mean squared error.
    """
    kind = normalize_prediction_type(prediction_type)
    if z0.shape != noise.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal the latent shape {tuple(z0.shape)}.")
    t = torch.as_tensor(t).to(device=z0.device, dtype=torch.long)
    z_t = add_noise(z0, noise, t, alphas_cumprod)
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        a, s = alpha_sigma(alphas_cumprod, t, ndim=z0.ndim)
        target = a * noise - s * z0
    else:
        target = z0
    return _distance(model_fn(z_t, t), target, "l2")
