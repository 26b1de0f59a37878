"""The whole teacher training (VAE phase, latent encoding, UNet phase) on one or several CPU workers.

:func:`train_teacher_parallel` spawns ``workers`` data-parallel processes (``gloo``,
``torch.multiprocessing.spawn``) that each run :func:`train_teacher` on their own batches;
with one worker it trains in this process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from condistill.seeding import torch_generator
from worldbuild.architecture import TeacherArchitecture, build_text_encoder, build_unet, build_vae
from worldbuild.training import (
    Logger,
    TrainingSettings,
    encode_latents,
    train_unet,
    train_vae,
    trained_modules,
)

#: stride between the workers' torch generators: worker ``rank`` draws from ``seed * 1000 + rank``
WORKER_SEED_STRIDE = 1000


def _quiet(_: str) -> None:
    return None


def _gather_rows(x: torch.Tensor, n_total: int) -> torch.Tensor:
    """Inverse of ``rows[rank::world]`` sharding: all-gather and interleave back to ``n_total`` rows."""
    import torch.distributed as dist

    world = dist.get_world_size()
    per = -(-n_total // world)
    padded = torch.zeros((per,) + tuple(x.shape[1:]), dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((n_total,) + tuple(x.shape[1:]), dtype=x.dtype)
    for r in range(world):
        rows = torch.arange(r, n_total, world)
        out[rows] = parts[r][: len(rows)]
    return out


def train_teacher(rank: int, world: int, settings: TrainingSettings, images_u8: torch.Tensor,
                  token_ids: torch.Tensor, empty_ids: torch.Tensor, vae, text_encoder, unet,
                  log: Logger = print, deadline: float | None = None) -> dict:
    """VAE phase, latent encoding + scaling factor, UNet/text-encoder phase, on one worker.

    With ``world > 1`` this runs in each of ``world`` data-parallel processes that share a
    ``torch.distributed`` group: every worker draws its own batches (generator seeded by
    ``(seed, rank)``), gradients are averaged every step, latents are encoded in shards and
    gathered. The models are trained in place (EMA weights copied in at the end). ``deadline``
    (a ``time.time()`` value, or None to run every step) is when UNet training must end. Returns
    the loss histories, timings and latent statistics.
    """
    torch.set_num_threads(settings.threads)
    gen = torch_generator(settings.seed, rank, WORKER_SEED_STRIDE)
    log = log if rank == 0 else _quiet
    timings: dict[str, float] = {}
    vae_hist = train_vae(vae, images_u8, settings.vae_steps, settings.vae_batch_size, settings.vae_lr,
                         settings.kl_weight, settings.vae_crop, settings.vae_full_res_fraction, gen, log,
                         settings.log_every)
    timings["vae_s"] = vae_hist.seconds
    vae.requires_grad_(False)

    t = time.time()
    N = images_u8.shape[0]
    lat_mean, lat_std = encode_latents(vae, images_u8[rank::world])
    if world > 1:
        lat_mean, lat_std = _gather_rows(lat_mean, N), _gather_rows(lat_std, N)
    # the same draw on every worker: the scaling factor must be identical everywhere
    draw = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=torch_generator(settings.seed))
    latent_std = float(draw.std())
    if settings.vae_steps > 0:
        scaling_factor = 1.0 / latent_std
        vae.register_to_config(scaling_factor=scaling_factor)
    else:  # a pretrained VAE is kept as it is: the UNet it came with was trained on this scaling
        scaling_factor = float(vae.config.scaling_factor)
    timings["encode_s"] = time.time() - t
    latent_stats = {
        "std": latent_std,
        "mean": float(draw.mean()),
        "channel_mean": draw.mean(dim=(0, 2, 3)).tolist(),
        "channel_std": draw.std(dim=(0, 2, 3)).tolist(),
        "posterior_std_mean": float(lat_std.mean()),
        "scaling_factor": scaling_factor,
    }
    log(f"latents encoded in {timings['encode_s']:.0f}s: std {latent_std:.3f} -> scaling_factor {scaling_factor:.4f}")

    unet_hist, ema = train_unet(
        unet, text_encoder, lat_mean, lat_std, scaling_factor, token_ids, empty_ids, settings.unet_steps,
        settings.batch_size, settings.lr, settings.caption_dropout, settings.snr_gamma or None,
        settings.ema_decay, gen, log, settings.log_every, deadline=deadline,
    )
    timings["unet_s"] = unet_hist.seconds
    ema.copy_to(trained_modules(unet, text_encoder))
    return {"timings": timings, "latents": latent_stats, "vae_loss": vae_hist.as_dict(),
            "unet_loss": unet_hist.as_dict()}


def _worker(rank: int, world: int, init_file: str, result_file: str, settings: TrainingSettings,
            images_u8, token_ids, empty_ids, states: dict, arch: TeacherArchitecture,
            deadline: float | None) -> None:
    import torch.distributed as dist

    torch.set_num_threads(settings.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tokenizer_size = states["vocab_size"]
        vae, unet = build_vae(arch), build_unet(arch)
        text_encoder = build_text_encoder(arch, _SizedTokenizerInfo(tokenizer_size, states["special_ids"]))
        vae.load_state_dict(states["vae"])
        vae.register_to_config(scaling_factor=states["scaling_factor"])
        unet.load_state_dict(states["unet"])
        text_encoder.load_state_dict(states["text_encoder"])
        report = train_teacher(rank, world, settings, images_u8, token_ids, empty_ids, vae, text_encoder, unet,
                               log=lambda m: print(m, flush=True), deadline=deadline)
        if rank == 0:
            torch.save({"report": report, "scaling_factor": vae.config.scaling_factor, "vae": vae.state_dict(),
                        "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict()}, result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@dataclass
class _SizedTokenizerInfo:
    """What :func:`build_text_encoder` needs from a tokenizer (picklable, for workers)."""

    size: int
    special_ids: tuple[int, int, int]

    def __len__(self) -> int:
        return self.size

    @property
    def bos_token_id(self) -> int:
        return self.special_ids[0]

    @property
    def eos_token_id(self) -> int:
        return self.special_ids[1]

    @property
    def pad_token_id(self) -> int:
        return self.special_ids[2]


def train_teacher_parallel(workers: int, settings: TrainingSettings, images_u8: torch.Tensor,
                           token_ids: torch.Tensor, empty_ids: torch.Tensor, vae, text_encoder, unet, tokenizer,
                           arch: TeacherArchitecture, log: Logger = print, deadline: float | None = None) -> dict:
    """:func:`train_teacher` in ``workers`` data-parallel processes (``settings.threads`` each).

    On a small shared CPU, two single-threaded processes that synchronise once per step use
    two cores far better than one process with two OpenMP threads, whose per-operator
    barriers stall whenever another job preempts one thread. ``workers == 1`` trains
    in this process. The trained weights are loaded back into ``vae``, ``text_encoder``
    and ``unet``.
    """
    import tempfile

    import torch.multiprocessing as mp

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        return train_teacher(0, 1, settings, images_u8, token_ids, empty_ids, vae, text_encoder, unet, log,
                             deadline)
    states = {"vae": vae.state_dict(), "scaling_factor": float(vae.config.scaling_factor),
              "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
              "vocab_size": len(tokenizer),
              "special_ids": (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)}
    with tempfile.TemporaryDirectory(prefix="condistill-teacher-") as tmp:
        init_file, result_file = str(Path(tmp) / "pg_init"), str(Path(tmp) / "result.pt")
        log(f"training in {workers} data-parallel worker processes x {settings.threads} thread(s)")
        mp.spawn(_worker, args=(workers, init_file, result_file, settings, images_u8, token_ids, empty_ids,
                                states, arch, deadline), nprocs=workers, join=True)
        result = torch.load(result_file, weights_only=False)
    vae.load_state_dict(result["vae"])
    vae.register_to_config(scaling_factor=result["scaling_factor"])
    vae.requires_grad_(False)
    unet.load_state_dict(result["unet"])
    text_encoder.load_state_dict(result["text_encoder"])
    for m in (vae, unet, text_encoder):
        m.eval()
    return result["report"]
