"""Pretrain the tiny embedded text-to-image teacher on the synthetic scenes.

Builds a standard diffusers Stable Diffusion folder (vae, text_encoder, tokenizer, unet,
scheduler, model_index.json) that loads with plain ``StableDiffusionPipeline``:

1. render ``--num-scenes`` training scenes (deterministic by ``--seed``);
2. train the VAE (64x64 -> 4x16x16) for reconstruction, set ``scaling_factor`` from the
   measured latent std;
3. encode every scene once, then train UNet + text encoder jointly with the epsilon loss,
   10% caption dropout and an EMA of the weights;
4. save the folder plus ``training_config.json`` (resolved config) and
   ``training_summary.json`` (losses, timings, parameter counts).

The committed ``condistill/assets/tiny-teacher`` is exactly::

    python tools/pretrain_teacher.py --output-dir condistill/assets/tiny-teacher

Continue training an existing teacher (its VAE and scaling factor are kept; only the
UNet and text encoder train further, from their saved weights)::

    python tools/pretrain_teacher.py --init-from condistill/assets/tiny-teacher --unet-steps 4000 --lr 5e-4 \
        --output-dir runs/teacher-continued

Smoke test (seconds)::

    python tools/pretrain_teacher.py --output-dir runs/teacher-smoke --vae-steps 2 --unet-steps 2 --num-scenes 16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from condistill.utils import count_parameters
from worldbuild.architecture import (
    TeacherArchitecture,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    with_cross_attention_everywhere,
)
from worldbuild.cli import config_from_args, parse_int_tuple, parser_from_dataclass
from worldbuild.parallel import train_teacher_parallel
from worldbuild.render import render_scenes
from worldbuild.saving import folder_size_bytes, load_weights_from, save_teacher
from worldbuild.tokenizer import build_tokenizer, tokenize, write_tokenizer_files
from worldbuild.training import TrainingSettings, reconstruction_error


@dataclass
class PretrainConfig(TrainingSettings):
    """The training hyper-parameters (:class:`~worldbuild.training.TrainingSettings`) plus the data,
    paths, workers and architecture of a run."""

    output_dir: str = "condistill/assets/tiny-teacher"
    num_scenes: int = 10000
    workers: int = 2
    time_budget_min: float = 0.0
    # continue from an existing teacher folder: its VAE is kept (vae_steps is ignored), its
    # UNet and text encoder are the starting point, its architecture is used
    init_from: str = ""
    # with init_from: move the weights into a UNet with cross-attention at every level (new
    # attention layers start as exact no-ops), the layout stock T2I-Adapters need
    cross_attention_everywhere: bool = False
    architecture: TeacherArchitecture = field(default_factory=TeacherArchitecture)

    def __post_init__(self):
        if isinstance(self.architecture, dict):
            self.architecture = TeacherArchitecture(**self.architecture)
        if not str(self.output_dir).strip():
            raise ValueError("output_dir must be a non-empty path")
        positive = ("num_scenes", "workers", "threads", "vae_batch_size", "batch_size", "log_every", "vae_crop")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.init_from:
            cfg_file = Path(self.init_from) / "training_config.json"
            if not cfg_file.is_file():
                raise ValueError(f"init_from {self.init_from!r} is not a teacher folder written by this recipe "
                                 f"(no training_config.json); pass the folder of a finished run")
            if Path(self.init_from).resolve() == Path(self.output_dir).resolve():
                raise ValueError("init_from and output_dir are the same folder; write the continued teacher to a "
                                 "new --output-dir so the starting weights are not overwritten")
            self.architecture = TeacherArchitecture(**json.loads(cfg_file.read_text())["architecture"])
        if self.cross_attention_everywhere and not self.init_from:
            raise ValueError("cross_attention_everywhere converts a saved teacher: pass init_from too")
        for name in ("vae_steps", "unet_steps"):
            if self.init_from and name == "vae_steps":
                continue
            if self.init_from and name == "unet_steps" and self.unet_steps == 0:
                continue  # a pure conversion/copy of the saved teacher
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (the saved model must be trained), got {getattr(self, name)}")
        for name in ("vae_lr", "lr"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if not 0 <= self.vae_full_res_fraction <= 1:
            raise ValueError(f"vae_full_res_fraction must be in [0, 1], got {self.vae_full_res_fraction}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.snr_gamma < 0:
            raise ValueError(f"snr_gamma must be >= 0 (0 disables Min-SNR weighting), got {self.snr_gamma}")
        if self.time_budget_min < 0:
            raise ValueError(f"time_budget_min must be >= 0 (0 = no budget), got {self.time_budget_min}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        res, f = self.architecture.resolution, self.architecture.downsample_factor
        if self.vae_crop > res or self.vae_crop % f:
            raise ValueError(f"vae_crop must be <= resolution ({res}) and a multiple of the VAE factor {f}, "
                             f"got {self.vae_crop}")

    def to_dict(self) -> dict:
        return asdict(self)


HELPS = {
    "output_dir": "folder to write the diffusers pipeline into",
    "num_scenes": "training scenes rendered (SyntheticScenes('train') indices 0..N-1)",
    "seed": "seed of the scenes, the weight init and every random draw of training",
    "workers": "data-parallel training processes (gradients averaged each step; batch sizes are per worker); "
               "1 trains in this process",
    "threads": "torch CPU threads per worker process (torch.set_num_threads)",
    "vae_steps": "VAE optimisation steps",
    "vae_batch_size": "images per VAE step and worker",
    "vae_lr": "VAE peak learning rate (AdamW, cosine)",
    "vae_crop": "side of the random crops most VAE steps train on (the last steps use full images)",
    "vae_full_res_fraction": "fraction of VAE steps, at the end, that use whole images instead of crops",
    "kl_weight": "weight of the per-pixel KL term of the VAE loss (keeps latents near N(0, I))",
    "unet_steps": "UNet + text encoder optimisation steps",
    "batch_size": "latents per UNet step and worker",
    "lr": "UNet/text encoder peak learning rate (AdamW, cosine)",
    "caption_dropout": "probability a caption is replaced by the empty prompt (for classifier-free guidance)",
    "snr_gamma": "Min-SNR loss weighting gamma; 0 trains with the plain epsilon MSE",
    "ema_decay": "EMA decay of the saved weights",
    "time_budget_min": "wall-clock budget of the whole run in minutes: the UNet phase measures its speed over its "
                       "first steps and trains for as many steps (at most --unet-steps) as fit; the resolved "
                       "count is written to training_config.json. 0 = always run --unet-steps",
    "init_from": "teacher folder written by this recipe to continue from: its VAE (and scaling factor) is kept, "
                 "its UNet and text encoder train for --unet-steps more steps; the architecture flags are "
                 "ignored; --unet-steps 0 only copies (or converts) it",
    "cross_attention_everywhere": "with --init-from: move the weights into a UNet with cross-attention at every "
                                  "level (the added layers start as exact no-ops), the layout stock "
                                  "T2I-Adapters can feed",
    "log_every": "print the mean loss every N steps",
}


def build_parser() -> argparse.ArgumentParser:
    p = parser_from_dataclass(
        PretrainConfig, "Train the tiny text-to-image teacher (diffusers Stable Diffusion layout) on synthetic "
                        "scenes.", helps=HELPS, skip=("architecture",))
    d = TeacherArchitecture()
    p.add_argument("--unet-channels", type=parse_int_tuple, default=d.unet_channels, metavar="A,B,C",
                   help="comma-separated UNet widths per level (16x16, 8x8, 4x4 latents) "
                        f"(default {','.join(map(str, d.unet_channels))})")
    p.add_argument("--text-layers", type=int, default=d.text_layers,
                   help=f"text encoder layers (default {d.text_layers})")
    return p


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    p = build_parser()
    a = p.parse_args(argv)

    def build(**values) -> PretrainConfig:
        arch = TeacherArchitecture(unet_channels=a.unet_channels, text_layers=a.text_layers,
                                   unet_cross_attention=(False,) + (True,) * (len(a.unet_channels) - 1))
        return PretrainConfig(**values, architecture=arch)

    return config_from_args(PretrainConfig, a, p, build)


def run(cfg: PretrainConfig, log=print) -> dict:
    """Train and save the teacher described by ``cfg``; returns the training summary."""
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    arch = cfg.architecture
    out = Path(cfg.output_dir)

    t = time.time()
    scenes = render_scenes("train", cfg.num_scenes, arch.resolution, cfg.seed, targets=False)
    images, captions = scenes.images_chw(), scenes.captions
    heldout = render_scenes("heldout", min(256, cfg.num_scenes), arch.resolution, cfg.seed,
                            targets=False).images_chw()
    render_s = time.time() - t
    log(f"rendered {cfg.num_scenes} train scenes in {render_s:.1f}s")

    tokenizer = build_tokenizer(model_max_length=arch.max_length)
    text_encoder = build_text_encoder(arch, tokenizer)
    vae = build_vae(arch)
    unet = build_unet(arch)
    if cfg.init_from:
        load_weights_from(cfg.init_from, vae=vae, text_encoder=text_encoder, unet=unet)
        log(f"continuing from {cfg.init_from}: VAE kept, UNet and text encoder train {cfg.unet_steps} more steps")
        if cfg.cross_attention_everywhere:
            unet, arch = with_cross_attention_everywhere(unet, arch)
            cfg.architecture = arch
            log(f"UNet now has cross-attention at every level ({count_parameters(unet)} parameters)")
    scheduler = build_scheduler()

    params = {"vae": count_parameters(vae), "text_encoder": count_parameters(text_encoder),
              "unet": count_parameters(unet)}
    log(f"parameters: {params}")
    token_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    settings = TrainingSettings(**{f.name: getattr(cfg, f.name) for f in fields(TrainingSettings)})
    if cfg.init_from:
        settings.vae_steps = 0
    # keep ~1 minute of a time budget for the held-out reconstruction check and saving
    deadline = t_start + 60.0 * cfg.time_budget_min - 60.0 if cfg.time_budget_min else None
    report = train_teacher_parallel(cfg.workers, settings, images, token_ids, empty_ids, vae, text_encoder,
                                    unet, tokenizer, arch, log, deadline)
    report["timings"]["render_scenes_s"] = render_s
    report["latents"]["heldout_reconstruction_mae_0_255"] = reconstruction_error(vae, heldout)
    log(f"VAE held-out reconstruction MAE {report['latents']['heldout_reconstruction_mae_0_255']:.2f} / 255")

    save_teacher(out, vae, text_encoder, tokenizer, unet, scheduler)
    write_tokenizer_files(out / "tokenizer")
    report["timings"]["total_s"] = time.time() - t_start
    summary = {
        "parameters": params,
        **report,
        "machine": {"torch": torch.__version__, "workers": cfg.workers, "threads_per_worker": cfg.threads,
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
    }
    if cfg.init_from:
        prev = Path(cfg.init_from) / "training_summary.json"
        if prev.is_file():  # keep the history: total cost = the earlier run(s) + this one
            summary["continued_from"] = json.loads(prev.read_text())
    resolved = cfg.to_dict()
    resolved["unet_steps"] = report["unet_loss"]["steps"][-1] if report["unet_loss"]["steps"] else cfg.unet_steps
    resolved["unet_steps_requested"] = cfg.unet_steps
    if cfg.init_from:
        resolved["vae_steps"] = 0
        resolved["continued_from"] = json.loads((Path(cfg.init_from) / "training_config.json").read_text())
    (out / "training_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["folder_bytes"] = folder_size_bytes(out)
    log(f"saved {out} ({summary['folder_bytes'] / 1e6:.1f} MB) in {report['timings']['total_s'] / 60:.1f} min")
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    run(cfg, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
