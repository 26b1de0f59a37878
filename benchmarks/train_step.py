#!/usr/bin/env python
"""Time and memory of one distillation step against one conventional adapter step.

Both steps use the same base, adapter, batch and device; each is warmed up, then timed over
``--steps`` optimizer steps. On CUDA the peak allocated memory of each step is reported. On
the CPU each kind of step runs in its own fresh Python process (the script re-runs itself with
``--only``) and the peak resident set of that whole process is reported: a process's maximum
RSS only grows, so one process running both steps could not tell them apart.

With ``--plain`` (ControlNet only) a third step is timed: the conventional ControlNet step of
diffusers' ``examples/controlnet/train_controlnet.py`` written out in plain diffusers calls
(VAE-encode a latent sample, noise it at a random timestep, encode the prompt, ControlNet, UNet
with its residuals, MSE on the noise, backward, clip, AdamW step), with no condistill code in the
step, so the library's own overhead shows.

``--cached`` adds the conventional and CoDi steps on the batch as a latent cache holds it (VAE
latents and caption embeddings computed beforehand), and reports the cached CoDi step against the
uncached conventional one. ``--online-ode`` adds the CoDi step with ``--ode-source online``.

    python benchmarks/train_step.py --adapter controlnet --batch-size 32 --steps 10
    python benchmarks/train_step.py --base runs/sd15-random --resolution 512 --batch-size 1 --steps 2 --warmup 1 --plain
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from condistill.config import DistillConfig
from condistill.data.dataset import ConditionDataset, collate
from condistill.data.sources import open_source
from condistill.training.ema import EMA
from condistill.training.fake_score import FakeScore
from condistill.training.objective import DTYPES, build_objective
from condistill.adapters import build_student
from condistill.frozen import load_base
from condistill.conditions import get_condition


#: the step kinds that are not a loss name of their own: kind -> (loss, ode_source, cached)
VARIANTS = {"plain": ("diffusion", "ema", False), "codi-online-ode": ("codi", "online", False),
            "diffusion-cached": ("diffusion", "ema", True), "codi-cached": ("codi", "ema", True),
            "codi-online-ode-cached": ("codi", "online", True)}


def cached_batch(base, batch: dict) -> dict:
    """``batch`` as a latent cache (``condistill cache``) gives it: VAE latents and caption
    embeddings computed beforehand, so the step runs neither encoder."""
    with torch.no_grad():
        latents = base.encode_images(batch["pixel_values"].to(base.device))
        embeds = base.encode_prompts(list(batch["caption"]))
    return {"latents": latents, "prompt_embeds": embeds,
            **{k: v for k, v in batch.items() if k not in ("pixel_values", "latents", "prompt_embeds")}}


def guidance_min(args) -> float:
    """The lowest guidance scale drawn per sample: ``--guidance-min``, else one fixed scale ``--guidance-max``."""
    if args.guidance_min is not None:
        return args.guidance_min
    return args.guidance_max if args.guidance_max > 1 else 1.0


def synthetic_batch(condition, batch_size: int, resolution: int) -> dict:
    """``batch_size`` training scenes at ``resolution`` with ``condition`` (a Condition), collated as the loop reads them."""
    ds = ConditionDataset(open_source(f"synthetic:train:{batch_size}", resolution=resolution), condition, resolution)
    return collate([ds[i] for i in range(batch_size)])


def run(kind: str, args, base, batch) -> dict:
    loss, ode_source, cached = VARIANTS.get(kind, (kind, "ema", False))
    if cached:
        batch = cached_batch(base, batch)
    cfg = DistillConfig(condition=args.condition, adapter=args.adapter, base=args.base, loss=loss, ode_source=ode_source,
                        batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                        guidance_min=guidance_min(args), guidance_max=args.guidance_max, output_dir="unused", dmd_fake_updates=args.dmd_fake_updates,
                        dmd_fake_targets=args.dmd_fake_targets, gan_weight=args.gan_weight)
    device = base.device
    student = build_student(args.adapter, base, get_condition(args.condition).channels).to(device)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    params = student.trainable_named_parameters()
    opt = torch.optim.AdamW(params.values(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.mixed_precision], enabled=args.mixed_precision != "no")
    if kind == "plain":
        step = _plain_controlnet_step(base, student.controlnet, opt, batch, autocast)
    else:
        ema = EMA(params)
        fake = FakeScore.from_config(cfg, student, base) if cfg.distribution_matching else None
        objective = build_objective(cfg, student, student, ema, base, fake_score=fake)

        def step(i):
            with autocast:
                l, _ = objective(batch, i)
            l.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(params, 0.95)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    out = {"seconds_per_step": dt, "images_per_second": args.batch_size / dt}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        out["peak_rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return out


def _plain_controlnet_step(base, controlnet, opt, batch, autocast):
    """The conventional ControlNet training step as diffusers' example script takes it, in plain calls."""
    vae, unet, text_encoder, tokenizer = base.vae, base.unet, base.text_encoder, base.tokenizer
    alphas = base.alphas_cumprod.to(base.device)
    ids = tokenizer(batch["caption"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(base.device)
    pixels = batch["pixel_values"].to(base.device, base.dtype)
    cond = batch["conditioning"].to(base.device, base.dtype)
    if cond.shape[1] == 1:  # the example reads RGB conditioning images
        cond = cond.expand(-1, controlnet.config.conditioning_channels, -1, -1)

    def step(i):
        g = torch.Generator().manual_seed(i)
        with autocast:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
                hidden = text_encoder(ids)[0]
            noise = torch.randn(latents.shape, generator=g).to(latents)
            t = torch.randint(0, alphas.shape[0], (latents.shape[0],), generator=g).to(base.device)
            a = alphas[t].view(-1, 1, 1, 1).to(latents)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=cond, return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _memory_ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if b[key] > 0 else None


def _time_ratio(a: dict, b: dict) -> float:
    return a["seconds_per_step"] / b["seconds_per_step"]


def add_variants(report: dict, measure, args, key: str) -> None:
    """Time the kinds of step the flags ask for beyond the conventional and CoDi steps already in
    ``report`` (``measure(kind)`` times one: in a fresh process or in this one) and add each with
    its ratios; ``key`` is the memory figure the ratios compare."""
    conventional, codi = report["conventional"], report["codi"]
    if args.dmd:
        dmd = measure("codi+dmd")
        report.update(codi_dmd=dmd, dmd_time_ratio_to_codi=_time_ratio(dmd, codi),
                      dmd_memory_ratio_to_codi=_memory_ratio(dmd, codi, key))
    if args.cached:
        conventional_cached, codi_cached = measure("diffusion-cached"), measure("codi-cached")
        report.update(conventional_cached=conventional_cached, codi_cached=codi_cached,
                      codi_cached_to_uncached_conventional=_time_ratio(codi_cached, conventional))
        if args.online_ode:
            cheap_cached = measure("codi-online-ode-cached")
            report.update(codi_online_ode_cached=cheap_cached,
                          online_ode_cached_to_uncached_conventional=_time_ratio(cheap_cached, conventional))
    if args.online_ode:
        cheap = measure("codi-online-ode")
        report.update(codi_online_ode=cheap, online_ode_time_ratio_to_codi=_time_ratio(cheap, codi),
                      online_ode_time_ratio=_time_ratio(cheap, conventional),
                      online_ode_memory_ratio=_memory_ratio(cheap, conventional, key))
    if args.plain:
        plain = measure("plain")
        report.update(plain_diffusers=plain, time_ratio_to_plain=_time_ratio(codi, plain),
                      conventional_to_plain=_time_ratio(conventional, plain))


def _in_fresh_process(loss: str) -> dict:
    """Re-run this script for one kind of step only and read its JSON line."""
    argv = [a for a in sys.argv[1:]]
    res = subprocess.run([sys.executable, __file__, *argv, "--only", loss], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"the {loss} benchmark process failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    """The command line of this script (also how ``gpu_check.py`` builds the options of a step)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="embedded:tiny-teacher")
    p.add_argument("--condition", default="edge")
    p.add_argument("--adapter", default="controlnet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--guidance-max", type=float, default=1.0, help=">1 benchmarks CFG-aware distillation")
    p.add_argument("--guidance-min", type=float, default=None,
                   help="lowest guidance scale drawn per sample [--guidance-max: one fixed scale]")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--resolution", type=int, default=0, help="image side in pixels [the base's native resolution]")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--plain", action="store_true",
                   help="also time the plain diffusers ControlNet step (controlnet adapter only)")
    p.add_argument("--dmd", action="store_true",
                   help="also time the codi+dmd step (distribution matching with its fake-score update)")
    p.add_argument("--dmd-fake-updates", type=int, default=1)
    p.add_argument("--dmd-fake-targets", default="attention_ff", choices=["attention", "attention_ff", "all"])
    p.add_argument("--gan-weight", type=float, default=0.0, help="> 0 adds the adversarial head to the codi+dmd step")
    p.add_argument("--online-ode", action="store_true",
                   help="also time the CoDi step whose one-step ODE is the detached online prediction (--ode-source online)")
    p.add_argument("--cached", action="store_true",
                   help="also time the conventional and CoDi steps on a cached batch (latents and caption "
                        "embeddings precomputed, as `condistill cache` stores them; the --plain step always encodes)")
    p.add_argument("--only", choices=["diffusion", "codi", "plain", "codi+dmd", *VARIANTS], default=None,
                   help="run one kind of step and print its figures as one JSON line (used on the CPU)")
    return p


def main():
    p = parser()
    args = p.parse_args()
    if args.plain and args.adapter != "controlnet":
        p.error("--plain times diffusers' ControlNet step; use it with --adapter controlnet")
    if args.device == "cpu" and args.only is None:
        conventional, codi = _in_fresh_process("diffusion"), _in_fresh_process("codi")
        report = {"device": "cpu", "adapter": args.adapter, "batch_size": args.batch_size,
                  "resolution": args.resolution or None, "gradient_checkpointing": args.gradient_checkpointing,
                  "mixed_precision": args.mixed_precision, "separate_processes": True,
                  "conventional": conventional, "codi": codi,
                  "time_ratio": _time_ratio(codi, conventional),
                  "memory_ratio": _memory_ratio(codi, conventional, "peak_rss_mib")}
        add_variants(report, _in_fresh_process, args, "peak_rss_mib")
        print(json.dumps(report, indent=2))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.base, device=args.device, dtype=DTYPES[args.mixed_precision])
    cond = get_condition(args.condition)
    resolution = args.resolution or base.resolution
    batch = synthetic_batch(cond, args.batch_size, resolution)
    if args.only:
        print(json.dumps(run(args.only, args, base, batch)))
        return
    # the conventional step runs first so the distillation step cannot benefit from its warm caches
    conventional = run("diffusion", args, base, batch)
    codi = run("codi", args, base, batch)
    report = {"device": str(args.device), "adapter": args.adapter, "batch_size": args.batch_size,
              "resolution": resolution, "gradient_checkpointing": args.gradient_checkpointing,
              "mixed_precision": args.mixed_precision, "conventional": conventional, "codi": codi,
              "time_ratio": _time_ratio(codi, conventional)}
    key = "peak_memory_gib" if "peak_memory_gib" in codi else "peak_rss_growth_mib"
    report["memory_ratio"] = _memory_ratio(codi, conventional, key)
    add_variants(report, lambda kind: run(kind, args, base, batch), args, key)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
