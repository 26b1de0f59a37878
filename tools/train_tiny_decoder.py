"""Distil the embedded tiny teacher's VAE into a TAESD-style ``AutoencoderTiny``, and measure it.

    python tools/train_tiny_decoder.py                   # the committed condistill/assets/tiny-decoder
    python tools/train_tiny_decoder.py --smoke --output-dir runs/tiny-decoder-smoke
    python tools/train_tiny_decoder.py --eval-only --student runs/edge   # re-measure, also on a student's samples

Data: synthetic scenes of the ``train`` split, encoded once by the teacher's full VAE. Each
scene gives one latent in the UNet's (scaled) units: the posterior mean, a posterior sample,
or the mean plus Gaussian jitter (``--latent-jitter``), a third each by a seeded draw, so the
decoder also meets latents a little off the encoder's manifold, as a few-step sampler's are.
The target of the decoder is the full VAE's decode of that same latent (distillation: the
decoder copies the full VAE, not the scene); the target of the encoder is the posterior mean.
Loss: mean squared error on each. AdamW, warm-up then cosine; everything seeded, so the same
config gives the same weights on the same machine.

The saved ``AutoencoderTiny`` has ``scaling_factor = 1.0``: it decodes the UNet's scaled
latents as they are, the TAESD convention that stock pipelines' ``vae.decode(z / scaling_factor)``
expects (see :mod:`condistill.decoders`).

Measured on ``--heldout-scenes`` held-out scenes (and with ``--student RUN`` on that student's
few-step samples of the same scenes' conditions): PSNR of the fast decoder's images against
the full VAE's images of the same latents, Frechet distances of the embedded judge's features
(each decoder against the real scenes, and fast against full), and decode seconds per image.
Writes to ``--output-dir``: ``config.json`` + ``diffusion_pytorch_model.safetensors``
(``AutoencoderTiny.save_pretrained``), ``training_config.json`` and ``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from condistill.decoders import load_fast_decoder, save_fast_decoder, upsampling_factor
from condistill.frozen import load_base
from condistill.seeding import derive_seed, torch_generator
from condistill.training.lr import lr_factor
from condistill.utils import count_parameters
from worldbuild.cli import config_from_args, parser_from_dataclass
from worldbuild.render import render_scenes

METRICS_NAME = "metrics.json"
TRAINING_CONFIG_NAME = "training_config.json"


@dataclass
class TinyDecoderConfig:
    """One distillation run of the fast decoder."""

    teacher: str = "embedded:tiny-teacher"
    output_dir: str = "condistill/assets/tiny-decoder"
    channels: int = 16
    decoder_blocks: tuple[int, ...] = (3, 3, 1)
    encoder_blocks: tuple[int, ...] = (1, 2, 2)
    train_scenes: int = 4000
    heldout_scenes: int = 512
    steps: int = 2000
    batch_size: int = 24
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_floor: float = 0.05
    latent_jitter: float = 0.15
    seed: int = 0
    threads: int = 1
    log_every: int = 100
    timing_batch: int = 8

    def __post_init__(self):
        for name in ("channels", "train_scenes", "heldout_scenes", "steps", "batch_size", "threads", "log_every",
                     "timing_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("decoder_blocks", "encoder_blocks"):
            blocks = tuple(getattr(self, name))
            if not blocks or min(blocks) < 0:
                raise ValueError(f"{name} must be non-negative block counts, one per resolution, got {blocks!r}")
            setattr(self, name, blocks)
        if self.heldout_scenes < 2:
            raise ValueError("heldout_scenes must be at least 2 (a Frechet distance needs a covariance)")
        if self.batch_size > self.train_scenes:
            raise ValueError(f"batch_size ({self.batch_size}) cannot exceed train_scenes ({self.train_scenes})")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.lr_floor <= 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 < lr_floor <= 1; got {self.lr}, "
                             f"{self.weight_decay}, {self.lr_floor}")
        if self.warmup_steps < 0 or self.latent_jitter < 0:
            raise ValueError("warmup_steps and latent_jitter must be >= 0")

    @classmethod
    def smoke(cls, **overrides) -> "TinyDecoderConfig":
        """A seconds-long run that exercises every stage."""
        values = dict(output_dir="runs/tiny-decoder-smoke", train_scenes=64, heldout_scenes=16, steps=20,
                      batch_size=8, warmup_steps=2, log_every=5, timing_batch=4)
        values.update(overrides)
        return cls(**values)


# ----------------------------------------------------------------------------- data


@torch.no_grad()
def encode_scenes(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation, in scaled (UNet) units, of ``uint8 [N, 3, H, W]`` images."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch].float() / 127.5 - 1
        dist = vae.encode(x).latent_dist
        means.append(dist.mean * vae.config.scaling_factor)
        stds.append(dist.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def full_decode(vae, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The full VAE's images ``[N, 3, H, W]`` in ``[-1, 1]`` of scaled latents, as a stock pipeline decodes."""
    return torch.cat([vae.decode(latents[i:i + batch] / vae.config.scaling_factor).sample.clamp(-1, 1)
                      for i in range(0, latents.shape[0], batch)])


@torch.no_grad()
def fast_decode(decoder, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The fast decoder's images ``[N, 3, H, W]`` in ``[-1, 1]``, through the same ``z / scaling_factor``."""
    return torch.cat([decoder.decode(latents[i:i + batch] / decoder.config.scaling_factor).sample.clamp(-1, 1)
                      for i in range(0, latents.shape[0], batch)])


def training_latents(mean: torch.Tensor, std: torch.Tensor, jitter: float, seed: int) -> torch.Tensor:
    """One latent per scene: the mean, a posterior sample or the mean plus ``jitter`` noise, a third each."""
    gen = torch_generator(derive_seed(seed, 1))
    kind = torch.randint(0, 3, (mean.shape[0],), generator=gen)
    noise = torch.randn(mean.shape, generator=gen)
    z = mean.clone()
    z[kind == 1] += std[kind == 1] * noise[kind == 1]
    z[kind == 2] += jitter * noise[kind == 2]
    return z


# ----------------------------------------------------------------------------- model and training


def build_decoder(cfg: TinyDecoderConfig, latent_channels: int):
    from diffusers import AutoencoderTiny

    torch.manual_seed(derive_seed(cfg.seed, 2))
    return AutoencoderTiny(
        encoder_block_out_channels=(cfg.channels,) * len(cfg.encoder_blocks),
        decoder_block_out_channels=(cfg.channels,) * len(cfg.decoder_blocks),
        num_encoder_blocks=cfg.encoder_blocks,
        num_decoder_blocks=cfg.decoder_blocks,
        latent_channels=latent_channels,
        scaling_factor=1.0,
    )


def train(cfg: TinyDecoderConfig, base, log=print):
    """Render, encode and decode the training scenes with the full VAE, then distil; returns the decoder."""
    t0 = time.perf_counter()
    scenes = render_scenes("train", cfg.train_scenes, base.resolution, cfg.seed, targets=False)
    images = scenes.images_chw()
    mean, std = encode_scenes(base.vae, images)
    latents = training_latents(mean, std, cfg.latent_jitter, cfg.seed)
    targets = full_decode(base.vae, latents).half()
    log(f"data: {cfg.train_scenes} scenes encoded and decoded by the full VAE in {time.perf_counter() - t0:.0f} s; "
        f"latent std {float(mean.std()):.3f}, posterior std {float(std.mean()):.3f}")

    decoder = build_decoder(cfg, base.latent_channels).train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch_generator(derive_seed(cfg.seed, 3))
    history, t1 = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.lr_floor)
        idx = torch.randint(0, cfg.train_scenes, (cfg.batch_size,), generator=gen)
        dec_loss = F.mse_loss(decoder.decoder(latents[idx]), targets[idx].float())
        enc_loss = F.mse_loss(decoder.encoder(images[idx].float() / 127.5 - 1), mean[idx])
        optimizer.zero_grad(set_to_none=True)
        (dec_loss + enc_loss).backward()
        optimizer.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            psnr = float(10 * torch.log10(4.0 / dec_loss.detach()))  # [-1, 1] images: peak-to-peak 2
            history.append({"step": step + 1, "decoder_mse": float(dec_loss.detach()), "encoder_mse": float(enc_loss.detach())})
            log(f"step {step + 1}/{cfg.steps}  decoder mse {float(dec_loss.detach()):.5f} ({psnr:.2f} dB)  "
                f"encoder mse {float(enc_loss.detach()):.5f}  {time.perf_counter() - t1:.0f} s")
    decoder.requires_grad_(False)
    return decoder.eval(), {"history": history, "train_seconds": time.perf_counter() - t1,
                            "data_seconds": t1 - t0}


# ----------------------------------------------------------------------------- measurement


@torch.no_grad()
def seconds_per_image(fn, latents: torch.Tensor, repeats: int = 7) -> float:
    """Median wall-clock seconds per image of ``fn(latents)`` (one untimed warm-up)."""
    fn(latents)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(latents)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / latents.shape[0]


def compare(vae, decoder, latents: torch.Tensor, real: torch.Tensor, judge) -> dict:
    """Both decoders on the same scaled ``latents``: PSNR of fast vs full, Frechet distances on judge features.

    ``real`` are the scenes ``[N, 3, H, W]`` in ``[0, 1]`` the Frechet distances compare against.
    """
    from condistill.evaluation.metrics import frechet_distance, psnr

    full = (full_decode(vae, latents) + 1) / 2
    fast = (fast_decode(decoder, latents) + 1) / 2
    feats = {name: judge.features(x) for name, x in (("real", real), ("full", full), ("fast", fast))}
    return {
        "psnr_fast_vs_full": psnr(fast, full),
        "frechet_full_vs_real": float(frechet_distance(feats["full"], feats["real"])),
        "frechet_fast_vs_real": float(frechet_distance(feats["fast"], feats["real"])),
        "frechet_fast_vs_full": float(frechet_distance(feats["fast"], feats["full"])),
    }


def heldout_data(cfg: TinyDecoderConfig, base, condition=None) -> dict:
    """The held-out scenes of every measurement (those ``condistill eval`` scores, same seed offset)."""
    from condistill.conditions import get_condition
    from condistill.data.dataset import ConditionDataset, collate
    from condistill.data.sources import open_source

    source = open_source(f"synthetic:heldout:{cfg.heldout_scenes}", resolution=base.resolution)
    dataset = ConditionDataset(source, condition or get_condition("edge"), base.resolution, seed=cfg.seed + 12345)
    return collate([dataset[i] for i in range(len(dataset))])


@torch.no_grad()
def student_latents(run: str, base, data: dict, steps: int, seed: int, batch: int = 64) -> torch.Tensor:
    """The student's ``steps``-step latents (CFG 1, its own sampler) for the held-out conditions and captions."""
    from condistill.adapters.save_load import adapter_sampler, load_student, read_adapter_config
    from condistill.method.guidance import make_model_fn
    from condistill.method.sampler import make_scheduler, sample_latents

    student = load_student(run, base).eval()
    num_grid = read_adapter_config(run)["num_grid"]
    sampler = adapter_sampler(run)
    uncond = base.encode_prompts([""])
    h = base.resolution // base.vae_scale_factor
    out = []
    for i in range(0, data["conditioning"].shape[0], batch):
        cond, prompts = data["conditioning"][i:i + batch], list(data["caption"][i:i + batch])
        fn = make_model_fn(student, student.encode_condition(cond), cond.shape[0])
        text = base.encode_prompts(prompts)
        out.append(sample_latents(fn, make_scheduler(base, sampler, num_grid=num_grid),
                                  (cond.shape[0], base.latent_channels, h, h), text, uncond, steps,
                                  generator=torch_generator(seed + i), dtype=base.dtype))
    return torch.cat(out)


def measure(cfg: TinyDecoderConfig, base, decoder, student: str | None = None, student_steps: int = 4,
            log=print) -> dict:
    """Every figure of ``metrics.json``: quality on autoencoded held-out scenes (and a student's samples), speed."""
    from condistill.evaluation.metrics import psnr
    from condistill.world.judge import load_judge

    judge = load_judge()
    data = heldout_data(cfg, base)
    real = (data["pixel_values"] + 1) / 2
    latents = base.encode_images(data["pixel_values"])
    out = {"heldout_scenes": cfg.heldout_scenes, "autoencoded": compare(base.vae, decoder, latents, real, judge)}
    out["autoencoded"]["psnr_full_vs_real"] = psnr((full_decode(base.vae, latents) + 1) / 2, real)
    out["autoencoded"]["psnr_fast_vs_real"] = psnr((fast_decode(decoder, latents) + 1) / 2, real)
    # the encoder: its latents decoded by the full VAE, against the scenes
    tiny_latents = decoder.encode(data["pixel_values"]).latents * decoder.config.scaling_factor
    out["encoder"] = {"latent_rmse": float((tiny_latents - latents).pow(2).mean().sqrt()),
                      "latent_std": float(latents.std()),
                      "psnr_roundtrip_vs_real": psnr((full_decode(base.vae, tiny_latents) + 1) / 2, real)}
    log(f"autoencoded held-out scenes: {json.dumps(out['autoencoded'])}\nencoder: {json.dumps(out['encoder'])}")
    if student:
        from condistill.conditions import condition_from_config
        from condistill.adapters.save_load import read_adapter_config

        condition = condition_from_config(read_adapter_config(student)["condition_config"])
        sdata = heldout_data(cfg, base, condition)
        z = student_latents(student, base, sdata, student_steps, cfg.seed)
        out["student"] = {"run": student, "steps": student_steps,
                          **compare(base.vae, decoder, z, (sdata["pixel_values"] + 1) / 2, judge)}
        log(f"{student_steps}-step student {student}: {json.dumps(out['student'])}")
    z = latents[:cfg.timing_batch]
    out["timing"] = {
        "batch": cfg.timing_batch, "threads": torch.get_num_threads(),
        "full_vae_seconds_per_image": seconds_per_image(lambda x: full_decode(base.vae, x), z),
        "fast_decoder_seconds_per_image": seconds_per_image(lambda x: fast_decode(decoder, x), z),
        "full_vae_decoder_parameters": count_parameters(base.vae.decoder) + count_parameters(base.vae.post_quant_conv),
        "fast_decoder_parameters": count_parameters(decoder.decoder),
        "fast_encoder_parameters": count_parameters(decoder.encoder),
    }
    out["timing"]["speedup"] = (out["timing"]["full_vae_seconds_per_image"]
                                / out["timing"]["fast_decoder_seconds_per_image"])
    log(f"decode time: {json.dumps(out['timing'])}")
    return out


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> dict:
    parser = parser_from_dataclass(TinyDecoderConfig, __doc__.split("\n\n")[0], helps={
        "teacher": "the base whose VAE is distilled",
        "channels": "width of every encoder and decoder block",
        "decoder_blocks": "AutoencoderTiny blocks per decoder resolution (one entry per VAE level)",
        "encoder_blocks": "AutoencoderTiny blocks per encoder resolution",
        "latent_jitter": "std of the Gaussian jitter added to a third of the training latents (scaled units)",
        "timing_batch": "batch size of the decode-time measurement",
    })
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every stage")
    parser.add_argument("--eval-only", action="store_true", help="measure the decoder already in --output-dir")
    parser.add_argument("--student", default=None, help="also measure on this student run's few-step samples")
    parser.add_argument("--student-steps", type=int, default=4)
    args = parser.parse_args(argv)
    cfg = config_from_args(TinyDecoderConfig, args, parser, TinyDecoderConfig.smoke if args.smoke else None)
    torch.set_num_threads(cfg.threads)
    base = load_base(cfg.teacher)
    levels = len(base.vae.config.block_out_channels)
    if not args.eval_only and len(cfg.decoder_blocks) != levels:
        parser.error(f"--decoder-blocks needs {levels} entries for {cfg.teacher!r} (its VAE upsamples "
                     f"{levels - 1} times), got {cfg.decoder_blocks}")
    if not args.eval_only and len(cfg.encoder_blocks) != levels:
        parser.error(f"--encoder-blocks needs {levels} entries for {cfg.teacher!r}, got {cfg.encoder_blocks}")
    out = Path(cfg.output_dir)
    if args.eval_only:
        decoder = load_fast_decoder(out)
        if upsampling_factor(decoder) != base.vae_scale_factor:
            parser.error(f"{out} upsamples by {upsampling_factor(decoder)}, the teacher's VAE by {base.vae_scale_factor}")
    else:
        decoder, facts = train(cfg, base)
        out.mkdir(parents=True, exist_ok=True)
        save_fast_decoder(decoder, out)
        record = {"config": asdict(cfg), "command": "python tools/train_tiny_decoder.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "torch": torch.__version__, "platform": platform.platform(terse=True),
                  "parameters": count_parameters(decoder), **facts}
        (out / TRAINING_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    metrics = measure(cfg, base, decoder, args.student, args.student_steps)
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out}")
    return metrics


if __name__ == "__main__":
    main()
