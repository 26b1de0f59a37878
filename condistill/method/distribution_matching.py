"""Pure functions of distribution matching distillation (DMD, Yin et al. CVPR 2024; DMD2, NeurIPS 2024).

The student's one-step output ``x`` (clean latents) is noised to ``x_t = a_t x + s_t eps`` at a
random ``t``. Two denoisers read the *same* ``(x_t, t)``: the frozen teacher (the real score,
with CFG) and a fake-score network trained online with the plain diffusion loss on the
student's own outputs. In clean-latent terms the gradient DMD applies to ``x`` is::

    g = (x0_fake(x_t, t) - x0_real(x_t, t)) / mean|x - x0_real(x_t, t)|         (per sample)

(the approximate KL gradient between the student's distribution and the teacher's, with DMD's
per-sample normaliser). Descending it moves ``x`` away from what the fake score predicts
(the student's current distribution) towards what the teacher predicts. It enters autograd as
``0.5 * mean((x - sg(x - g))^2)``, whose gradient in ``x`` is ``g / numel`` and which sends no
gradient into either score network.

Models enter as callables ``fn(z, t) -> raw output`` in the teacher's prediction type, like
the CoDi losses in :mod:`condistill.method.losses`; every loss returns one value per sample.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .schedule import add_noise, alpha_sigma, normalize_prediction_type, split_prediction

__all__ = [
    "dmd_timesteps",
    "dmd_gradient",
    "dmd_loss",
    "gan_generator_loss",
    "gan_discriminator_loss",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dmd_timesteps(batch: int, num_train_timesteps: int, t_min: float = 0.02, t_max: float = 0.98,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``t ~ U{floor(t_min T), ..., floor(t_max T) - 1}``: the noise levels the two scores are compared at.

    DMD2 leaves out the ends of the schedule: near 0 both scores return ``x`` itself, near T
    the sample's content is drowned.

    Returns:
        LongTensor ``[batch]`` on the generator's device (CPU without one).
    """
    T = int(num_train_timesteps)
    lo, hi = int(t_min * T), int(t_max * T)
    if not 0 <= lo < hi <= T:
        raise ValueError(f"the DMD timestep range [{t_min}, {t_max}] of T={T} is empty or outside [0, 1]; "
                         "use 0 <= t_min < t_max <= 1 (DMD2: 0.02 and 0.98).")
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(lo, hi, (int(batch),), generator=generator, device=device)


ScoresFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _both(scores) -> ScoresFn:
    if callable(scores):
        return scores
    real_fn, fake_fn = scores
    return lambda z, t: (real_fn(z, t), fake_fn(z, t))


@torch.no_grad()
def dmd_gradient(
    x: torch.Tensor,
    scores: ScoresFn | tuple[ModelFn, ModelFn],
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DMD gradient ``g [B, C, H, W]`` on the student's output ``x`` (float32, no graph).

    ::

        x_t  = a_t sg(x) + s_t eps                                   (both scores see this x_t, t)
        p_r  = x0(real(x_t, t)),  p_f = x0(fake(x_t, t))
        g    = (p_f - p_r) / max(mean|x - p_r|, eps)                 (mean over C, H, W per sample)

    Args:
        x: ``[B, C, H, W]`` clean latents produced by the student.
        scores: ``fn(x_t, t) -> (real, fake)``, the raw outputs of the frozen teacher (guidance applied
            by the caller) and of the fake-score network, e.g. from one shared call
            (:meth:`condistill.training.fake_score.FakeScore.scores`); or the pair ``(real_fn, fake_fn)``
            of two separate ``fn(x_t, t)``.
        noise: ``[B, C, H, W]`` standard normal noise.
        t: LongTensor ``[B]`` (:func:`dmd_timesteps`).
        alphas_cumprod: ``[T]`` teacher ``abar``.
        prediction_type: the teacher's (the fake score shares it).
        eps: floor of the normaliser.

    Returns:
        ``(g, info)`` with ``info`` holding ``"x_t"``, ``"real_x0"``, ``"fake_x0"`` and the
        per-sample ``"normaliser"`` ``[B]``.
    """
    kind = normalize_prediction_type(prediction_type)
    if x.shape != noise.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal the sample shape {tuple(x.shape)}.")
    x = x.detach().float()
    t = torch.as_tensor(t).to(device=x.device, dtype=torch.long)
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a LongTensor [B] with B={x.shape[0]}, got shape {tuple(t.shape)}.")
    x_t = add_noise(x, noise.float(), t, alphas_cumprod)
    a_t, s_t = alpha_sigma(alphas_cumprod, t, ndim=x.ndim)
    real, fake = _both(scores)(x_t, t)
    real_x0, _ = split_prediction(real.float(), x_t, a_t, s_t, kind)
    fake_x0, _ = split_prediction(fake.float(), x_t, a_t, s_t, kind)
    normaliser = (x - real_x0).abs().reshape(x.shape[0], -1).mean(dim=1).clamp_min(eps)
    g = (fake_x0 - real_x0) / normaliser.view(-1, *[1] * (x.ndim - 1))
    g = torch.nan_to_num(g)
    return g, {"x_t": x_t, "real_x0": real_x0, "fake_x0": fake_x0, "normaliser": normaliser}


def dmd_loss(x: torch.Tensor, scores: ScoresFn | tuple[ModelFn, ModelFn], noise: torch.Tensor, t: torch.Tensor,
             alphas_cumprod: torch.Tensor, prediction_type: str, eps: float = 1e-5
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample DMD loss ``0.5 * mean((x - sg(x - g))^2)`` whose gradient in ``x`` is ``g / (C H W)``.

    ``g`` is :func:`dmd_gradient` of the same arguments; the scores run without a graph, so neither
    receives a gradient from this loss.

    Returns:
        ``(loss [B], info)``; ``info["dmd_grad_norm"]`` is the per-sample RMS of ``g`` (detached).
    """
    g, _ = dmd_gradient(x, scores, noise, t, alphas_cumprod, prediction_type, eps)
    target = (x.detach().float() - g).detach()
    diff = x.float() - target
    loss = 0.5 * diff.pow(2).reshape(x.shape[0], -1).mean(dim=1)
    return loss, {"dmd_grad_norm": g.pow(2).reshape(x.shape[0], -1).mean(dim=1).sqrt()}


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))`` per sample (``[B, ...]`` logits -> ``[B]``)."""
    return F.softplus(-fake_logits.float()).reshape(fake_logits.shape[0], -1).mean(dim=1)


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``softplus(-D(real)) + softplus(D(fake))`` per sample (``[B]``)."""
    real = F.softplus(-real_logits.float()).reshape(real_logits.shape[0], -1).mean(dim=1)
    fake = F.softplus(fake_logits.float()).reshape(fake_logits.shape[0], -1).mean(dim=1)
    return real + fake
