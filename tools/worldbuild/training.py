"""The two training phases of the teacher: the VAE, then the UNet and text encoder on fixed latents.

Both phases run unchanged in one process or in each worker of a ``torch.distributed`` group
(:mod:`worldbuild.parallel`): gradients are averaged every step and decisions taken on rank 0.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from condistill.training.ema import EMA
from condistill.training.lr import lr_factor
from worldbuild.architecture import build_training_noise_scheduler

#: the teacher's learning rates decay (cosine) to this fraction of their peak
LR_FLOOR = 0.1

Logger = Callable[[str], None]


def to_unit_range(images_u8: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` -> ``float32`` in ``[-1, 1]`` (the VAE's pixel convention)."""
    return images_u8.float().div(127.5).sub(1.0)


def warm_ema_decay(updates: int, max_decay: float) -> float:
    """The EMA decay of update number ``updates`` (1-based): ``min(max_decay, (1 + n) / (10 + n))``.

    Early updates move the average fast, so it forgets the random initial weights.
    """
    if not 0.0 < max_decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {max_decay}")
    return min(max_decay, (1 + updates) / (10 + updates))


def trained_modules(unet, text_encoder) -> torch.nn.ModuleDict:
    """The two networks of the UNet phase under one module (parameter names ``unet.*``, ``text_encoder.*``)."""
    return torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})


def _agree(value: int) -> int:
    """Rank 0's ``value`` on every data-parallel worker (identity outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` over the default process group.

    One flat all-reduce per step: the data-parallel workers then take identical optimizer
    steps from identical initial weights, so their replicas never drift apart.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


@dataclass
class LossHistory:
    """Mean losses over windows of steps (``steps[i]`` is the last step of window ``i``, 1-based)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    _window: list[float] = field(default_factory=list, repr=False)

    def add(self, step: int, loss: float, total: int, every: int) -> float | None:
        """Collect the loss of ``step`` (0-based); every ``every`` steps and at step ``total`` record
        the window's mean and return it (else None)."""
        self._window.append(loss)
        if (step + 1) % every and step + 1 != total:
            return None
        mean_loss = float(np.mean(self._window))
        self._window = []
        self.steps.append(step + 1)
        self.losses.append(mean_loss)
        return mean_loss

    def as_dict(self) -> dict:
        return {"steps": list(self.steps), "losses": list(self.losses), "seconds": self.seconds}


# --------------------------------------------------------------------------- VAE phase
def train_vae(vae, images_u8: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float,
              crop: int, full_res_fraction: float, generator: torch.Generator, log: Logger = print,
              log_every: int = 50) -> LossHistory:
    """Train ``vae`` for reconstruction (L1 + MSE) plus ``kl_weight`` x KL.

    Most steps see random ``crop x crop`` windows (the VAE is fully convolutional, and
    crops are 4x cheaper at 32 px); the last ``full_res_fraction`` of the steps use whole
    images so the group-norm statistics match full-resolution use.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    N, _, H, W = images_u8.shape
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if crop > H or crop % factor:
        raise ValueError(f"crop {crop} must be <= {H} and a multiple of the VAE factor {factor}")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    full_from = steps - int(round(steps * full_res_fraction))
    hist, t0 = LossHistory(), time.time()
    vae.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, min(50, max(1, steps // 10)), steps, LR_FLOOR)
        idx = torch.randint(0, N, (batch_size,), generator=generator)
        x = to_unit_range(images_u8[idx])
        if step < full_from and crop < H:
            oy = int(torch.randint(0, (H - crop) // factor + 1, (1,), generator=generator)) * factor
            ox = int(torch.randint(0, (W - crop) // factor + 1, (1,), generator=generator)) * factor
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
        rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = post.kl().mean() / (x.shape[-1] * x.shape[-2])  # per pixel, comparable across crops
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(list(vae.parameters()))
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        mean_loss = hist.add(step, rec_loss.item(), steps, log_every)
        if mean_loss is not None:
            log(f"vae step {step + 1}/{steps} rec {mean_loss:.4f} kl {kl.item():.3f} "
                f"{'full' if step >= full_from else 'crop'} {time.time() - t0:.0f}s")
    hist.seconds = time.time() - t0
    vae.eval()
    return hist


@torch.no_grad()
def encode_latents(vae, images_u8: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    vae.eval()
    means, stds = [], []
    for start in range(0, images_u8.shape[0], batch_size):
        post = vae.encode(to_unit_range(images_u8[start:start + batch_size])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_error(vae, images_u8: torch.Tensor, batch_size: int = 256) -> float:
    """Mean absolute error in 0..255 pixel units of decode(posterior mean)."""
    errs = []
    for start in range(0, images_u8.shape[0], batch_size):
        x = to_unit_range(images_u8[start:start + batch_size])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        errs.append((rec - x).abs().mean(dim=(1, 2, 3)) * 127.5)
    return float(torch.cat(errs).mean())


# --------------------------------------------------------------------------- UNet phase
def train_unet(unet, text_encoder, latent_mean: torch.Tensor, latent_std: torch.Tensor, scaling_factor: float,
               token_ids: torch.Tensor, empty_ids: torch.Tensor, steps: int, batch_size: int, lr: float,
               caption_dropout: float, snr_gamma: float | None, ema_decay: float, generator: torch.Generator,
               log: Logger = print, log_every: int = 50,
               on_step: Callable[[int, EMA], None] | None = None,
               deadline: float | None = None, probe_steps: int = 60) -> tuple[LossHistory, EMA]:
    """Jointly train ``unet`` and the from-scratch ``text_encoder`` with the epsilon loss.

    Latents are drawn from the stored posterior (mean + std * noise) and scaled by
    ``scaling_factor``; captions are replaced by the empty prompt with probability
    ``caption_dropout`` (classifier-free guidance); ``snr_gamma`` enables Min-SNR loss
    weighting (Hang et al. 2023), which speeds up convergence of short runs. Returns the
    loss history and the EMA of both networks' weights, keyed by the names of
    :func:`trained_modules` (copy it in before saving: ``ema.copy_to(trained_modules(unet, text_encoder))``).
    ``on_step(step, ema)``, if given, is called after every optimizer step (e.g. to save
    intermediate checkpoints for a learning curve).

    ``deadline`` (a ``time.time()`` value) sizes the run to the machine: after
    ``probe_steps`` steps the measured seconds per step fix the total number of steps so
    training ends by the deadline (``steps`` stays the upper bound; the learning-rate
    warm-up depends only on ``steps``, so the schedule up to that point is unchanged). The
    resolved count is ``hist.steps[-1]``; passing it as ``steps`` without a deadline
    reproduces the run exactly. Data-parallel workers adopt rank 0's decision.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if deadline is not None and probe_steps < 2:
        raise ValueError(f"probe_steps must be >= 2 to measure the speed, got {probe_steps}")
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    if latent_mean.shape[0] != token_ids.shape[0]:
        raise ValueError(f"{latent_mean.shape[0]} latents but {token_ids.shape[0]} captions")
    noise_sched = build_training_noise_scheduler()
    alphas_cumprod = noise_sched.alphas_cumprod.float()
    T = noise_sched.config.num_train_timesteps
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm_ema_decay(0, ema_decay)  # validates the decay before any work
    named = dict(trained_modules(unet, text_encoder).named_parameters())
    ema = EMA(named)
    N = latent_mean.shape[0]
    hist, t0 = LossHistory(), time.time()
    unet.train()
    text_encoder.train()
    warmup = min(200, max(1, steps // 10))
    t_probe = t0
    step = 0
    while step < steps:
        if deadline is not None and step == min(10, probe_steps // 2):
            t_probe = time.time()
        if deadline is not None and step == probe_steps:
            per_step = (time.time() - t_probe) / (probe_steps - min(10, probe_steps // 2))
            affordable = probe_steps + int(max(0.0, deadline - time.time()) / per_step)
            steps = _agree(max(probe_steps, min(steps, affordable)))
            log(f"time budget: {per_step:.2f}s/step -> {steps} UNet steps in all")
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, warmup, steps, LR_FLOOR)
        idx = torch.randint(0, N, (batch_size,), generator=generator)
        z0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        z0 = z0 * scaling_factor
        ids = token_ids[idx].clone()
        drop = torch.rand(batch_size, generator=generator) < caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, T, (batch_size,), generator=generator)
        zt = noise_sched.add_noise(z0, noise, t)
        hidden = text_encoder(ids)[0]
        pred = unet(zt, t, hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma is not None:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            per_sample = per_sample * torch.clamp(snr, max=snr_gamma) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(named, warm_ema_decay(step + 1, ema_decay))
        if on_step is not None:
            on_step(step + 1, ema)
        mean_loss = hist.add(step, loss.item(), steps, log_every)
        if mean_loss is not None:
            el = time.time() - t0
            log(f"unet step {step + 1}/{steps} loss {mean_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{el:.0f}s ({el / (step + 1):.2f}s/step)")
        step += 1
    hist.seconds = time.time() - t0
    unet.eval()
    text_encoder.eval()
    return hist, ema


@dataclass
class TrainingSettings:
    """Hyper-parameters of :func:`worldbuild.parallel.train_teacher` (``tools/pretrain_teacher.py``'s
    ``PretrainConfig`` adds the data, paths, workers and architecture)."""

    seed: int = 0
    threads: int = 1
    vae_steps: int = 800
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_crop: int = 32
    vae_full_res_fraction: float = 0.1
    kl_weight: float = 1e-4
    unet_steps: int = 2600
    batch_size: int = 32
    lr: float = 1e-3
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    log_every: int = 50
