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

    python tools/pretrain_teacher.py --output-dir /tmp/t --vae-steps 2 --unet-steps 2 --num-scenes 16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worldbuild import teacher as T  # noqa: E402


@dataclass
class PretrainConfig:
    output_dir: str = "condistill/assets/tiny-teacher"
    num_scenes: int = 10000
    seed: int = 0
    workers: int = 2
    threads: int = 1
    # VAE
    vae_steps: int = 800
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_crop: int = 32
    vae_full_res_fraction: float = 0.1
    kl_weight: float = 1e-4
    # UNet + text encoder
    unet_steps: int = 2600
    batch_size: int = 32
    lr: float = 1e-3
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    log_every: int = 50
    time_budget_min: float = 0.0
    # continue from an existing teacher folder: its VAE is kept (vae_steps is ignored), its
    # UNet and text encoder are the starting point, its architecture is used
    init_from: str = ""
    # with init_from: move the weights into a UNet with cross-attention at every level (new
    # attention layers start as exact no-ops), the layout stock T2I-Adapters need
    cross_attention_everywhere: bool = False
    architecture: T.TeacherArchitecture = field(default_factory=T.TeacherArchitecture)

    def __post_init__(self):
        if isinstance(self.architecture, dict):
            self.architecture = T.TeacherArchitecture(**self.architecture)
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
            self.architecture = T.TeacherArchitecture(**json.loads(cfg_file.read_text())["architecture"])
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


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    d = PretrainConfig()
    p = argparse.ArgumentParser(
        description="Train the tiny text-to-image teacher (diffusers Stable Diffusion layout) on synthetic scenes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output-dir", default=d.output_dir, help="folder to write the diffusers pipeline into")
    p.add_argument("--num-scenes", type=int, default=d.num_scenes,
                   help="training scenes rendered (SyntheticScenes('train') indices 0..N-1)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the scenes, the weight init and every random draw of training")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="data-parallel training processes (gradients averaged each step; batch sizes are per "
                        "worker); 1 trains in this process")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads per worker process (torch.set_num_threads)")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help="VAE optimisation steps")
    p.add_argument("--vae-batch-size", type=int, default=d.vae_batch_size, help="images per VAE step and worker")
    p.add_argument("--vae-lr", type=float, default=d.vae_lr, help="VAE peak learning rate (AdamW, cosine)")
    p.add_argument("--vae-crop", type=int, default=d.vae_crop,
                   help="side of the random crops most VAE steps train on (the last steps use full images)")
    p.add_argument("--vae-full-res-fraction", type=float, default=d.vae_full_res_fraction,
                   help="fraction of VAE steps, at the end, that use whole images instead of crops")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight,
                   help="weight of the per-pixel KL term of the VAE loss (keeps latents near N(0, I))")
    p.add_argument("--unet-steps", type=int, default=d.unet_steps, help="UNet + text encoder optimisation steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="latents per UNet step and worker")
    p.add_argument("--lr", type=float, default=d.lr, help="UNet/text encoder peak learning rate (AdamW, cosine)")
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout,
                   help="probability a caption is replaced by the empty prompt (for classifier-free guidance)")
    p.add_argument("--snr-gamma", type=float, default=d.snr_gamma,
                   help="Min-SNR loss weighting gamma; 0 trains with the plain epsilon MSE")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay of the saved weights")
    p.add_argument("--time-budget-min", type=float, default=d.time_budget_min,
                   help="wall-clock budget of the whole run in minutes: the UNet phase measures its speed over "
                        "its first steps and trains for as many steps (at most --unet-steps) as fit; the "
                        "resolved count is written to training_config.json. 0 = always run --unet-steps")
    p.add_argument("--init-from", default=d.init_from,
                   help="teacher folder written by this recipe to continue from: its VAE (and scaling factor) is "
                        "kept, its UNet and text encoder train for --unet-steps more steps; the architecture "
                        "flags are ignored; --unet-steps 0 only copies (or converts) it")
    p.add_argument("--cross-attention-everywhere", action="store_true",
                   help="with --init-from: move the weights into a UNet with cross-attention at every level (the "
                        "added layers start as exact no-ops), the layout stock T2I-Adapters can feed")
    p.add_argument("--log-every", type=int, default=d.log_every, help="print the mean loss every N steps")
    p.add_argument("--unet-channels", default=",".join(map(str, d.architecture.unet_channels)),
                   help="comma-separated UNet widths per level (16x16, 8x8, 4x4 latents)")
    p.add_argument("--text-layers", type=int, default=d.architecture.text_layers, help="text encoder layers")
    a = p.parse_args(argv)
    try:
        unet_channels = tuple(int(c) for c in a.unet_channels.split(","))
    except ValueError:
        p.error(f"--unet-channels must be comma-separated integers, got {a.unet_channels!r}")
    try:
        arch = T.TeacherArchitecture(unet_channels=unet_channels, text_layers=a.text_layers,
                                     unet_cross_attention=(False,) + (True,) * (len(unet_channels) - 1))
        return PretrainConfig(
            output_dir=a.output_dir, num_scenes=a.num_scenes, seed=a.seed, workers=a.workers, threads=a.threads,
            vae_steps=a.vae_steps, vae_batch_size=a.vae_batch_size, vae_lr=a.vae_lr, vae_crop=a.vae_crop,
            vae_full_res_fraction=a.vae_full_res_fraction, kl_weight=a.kl_weight,
            unet_steps=a.unet_steps, batch_size=a.batch_size, lr=a.lr, caption_dropout=a.caption_dropout,
            snr_gamma=a.snr_gamma, ema_decay=a.ema_decay, log_every=a.log_every,
            time_budget_min=a.time_budget_min, init_from=a.init_from,
            cross_attention_everywhere=a.cross_attention_everywhere, architecture=arch,
        )
    except ValueError as e:
        p.error(str(e))
    raise AssertionError("unreachable")


def run(cfg: PretrainConfig, log=print) -> dict:
    """Train and save the teacher described by ``cfg``; returns the training summary."""
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    arch = cfg.architecture
    out = Path(cfg.output_dir)

    t = time.time()
    images, captions = T.render_scenes(cfg.num_scenes, "train", arch.resolution, cfg.seed)
    heldout, _ = T.render_scenes(min(256, cfg.num_scenes), "heldout", arch.resolution, cfg.seed)
    render_s = time.time() - t
    log(f"rendered {cfg.num_scenes} train scenes in {render_s:.1f}s")

    tokenizer = T.build_tokenizer(model_max_length=arch.max_length)
    text_encoder = T.build_text_encoder(arch, tokenizer)
    vae = T.build_vae(arch)
    unet = T.build_unet(arch)
    if cfg.init_from:
        T.load_weights_from(cfg.init_from, vae=vae, text_encoder=text_encoder, unet=unet)
        log(f"continuing from {cfg.init_from}: VAE kept, UNet and text encoder train {cfg.unet_steps} more steps")
        if cfg.cross_attention_everywhere:
            unet, arch = T.with_cross_attention_everywhere(unet, arch)
            cfg.architecture = arch
            log(f"UNet now has cross-attention at every level ({T.count_parameters(unet)} parameters)")
    scheduler = T.build_scheduler()

    params = {"vae": T.count_parameters(vae), "text_encoder": T.count_parameters(text_encoder),
              "unet": T.count_parameters(unet)}
    log(f"parameters: {params}")
    token_ids = T.tokenize(tokenizer, captions)
    empty_ids = T.tokenize(tokenizer, [""])[0]
    settings = T.TrainingSettings(**{f.name: getattr(cfg, f.name) for f in fields(T.TrainingSettings)
                                     if f.name != "unet_deadline"})
    if cfg.init_from:
        settings.vae_steps = 0
    if cfg.time_budget_min:
        # keep ~1 minute for the held-out reconstruction check and saving
        settings.unet_deadline = t_start + 60.0 * cfg.time_budget_min - 60.0
    report = T.train_teacher_parallel(cfg.workers, settings, images, token_ids, empty_ids, vae, text_encoder,
                                      unet, tokenizer, arch, log)
    report["timings"]["render_scenes_s"] = render_s
    report["latents"]["heldout_reconstruction_mae_0_255"] = T.reconstruction_error(vae, heldout)
    log(f"VAE held-out reconstruction MAE {report['latents']['heldout_reconstruction_mae_0_255']:.2f} / 255")

    T.save_teacher(out, vae, text_encoder, tokenizer, unet, scheduler)
    T.write_tokenizer_files(out / "tokenizer")
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
    summary["folder_bytes"] = T.folder_size_bytes(out)
    log(f"saved {out} ({summary['folder_bytes'] / 1e6:.1f} MB) in {report['timings']['total_s'] / 60:.1f} min")
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    run(cfg, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
