#!/usr/bin/env python
"""bf16 against float32 on the CPU: the training loss on one fixed batch, and the cost of sampling.

For each base, adapter kind and loss, the same student (seeded initialisation, moved away from its
zero initialisation by seeded noise so the adapter matters) computes the per-sample loss of one fixed
batch of 4 synthetic scenes twice: with the base in float32, and with the base in bf16 and the
objective inside bf16 autocast (the training loop's layout: float32 adapter, EMA and fake score).
The table gives the relative difference of the mean loss. It also times 8 images sampled in 4 steps
(what a validation grid samples) in each precision.

    python benchmarks/bf16_vs_fp32.py --tiny-components runs/tiny-components

measures the embedded teacher and tiny SD- and SDXL-shaped random-weight bases that
``sd_components.py`` builds (``TINY_SD15``, ``TINY_SDXL``) into that folder; ``--base`` adds others.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ADAPTERS = ("controlnet", "t2i_adapter", "lora")
LOSSES = ("codi", "codi+dmd")


def _perturbed_student(base, adapter: str, channels: int, seed: int = 3):
    from condistill.adapters import build_student

    torch.manual_seed(0)  # the same adapter (and fake-score LoRA) initialisation in both precisions
    student = build_student(adapter, base, channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(student.trainable_named_parameters().items()):
            param.add_(0.05 * torch.randn(param.shape, generator=gen).to(param.device, param.dtype))
    return student


def loss_pair(base_path: str, adapter: str, loss: str, micro_step: int = 5) -> dict:
    """The per-sample losses ``[4]`` in float32 and in bf16 (same weights, batch and draws), and the dtypes
    the bf16 run kept: ``{"fp32", "bf16", "master_dtypes", "loss_dtype"}``."""
    from condistill.conditions import get_condition
    from condistill.config import DistillConfig
    from condistill.data.dataset import ConditionDataset, collate
    from condistill.data.sources import open_source
    from condistill.frozen import load_base
    from condistill.training.ema import EMA
    from condistill.training.fake_score import FakeScore
    from condistill.training.objective import build_objective

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        base = load_base(base_path, dtype=dtype)
        condition = get_condition("edge")
        student = _perturbed_student(base, adapter, condition.channels)
        dataset = ConditionDataset(open_source("synthetic:train:4", resolution=base.resolution), condition,
                                   base.resolution)
        batch = collate([dataset[i] for i in range(4)])
        cfg = DistillConfig(base=base_path, adapter=adapter, loss=loss, guidance_min=1.0, guidance_max=3.0,
                            report_to="none")
        fake = FakeScore.from_config(cfg, student, base) if cfg.distribution_matching else None
        objective = build_objective(cfg, student, student, EMA(student.trainable_named_parameters()), base,
                                    fake_score=fake)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            value, _ = objective(batch, micro_step)
        out[name] = value.detach()
        out["master_dtypes"] = {p.dtype for p in student.trainable_named_parameters().values()}
        out["loss_dtype"] = value.dtype
    return out


def sampling_seconds(base_path: str, dtype: torch.dtype, images: int = 8, steps: int = 4) -> float:
    """Seconds to sample ``images`` images in ``steps`` steps with an untrained ControlNet student (after one
    untimed pass), the base in ``dtype`` and, for bf16, inside autocast."""
    from condistill.frozen import load_base
    from condistill.method.guidance import make_model_fn
    from condistill.method.sampler import sample_images

    base = load_base(base_path, dtype=dtype)
    student = _perturbed_student(base, "controlnet", 3).eval()
    cond = torch.rand(images, 3, base.resolution, base.resolution, generator=torch.Generator().manual_seed(0))

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fn = make_model_fn(student, student.encode_condition(cond), images)
            sample_images(base, fn, ["a red circle"] * images, steps, sampler="codi-stochastic")

    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def tiny_bases(folder: Path) -> list[str]:
    """The tiny SD- and SDXL-shaped bases of ``sd_components.py`` in ``folder`` (built when missing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sd_components import TINY_SD15, TINY_SDXL, build_sd15, build_sdxl

    out = []
    for name, build, config in (("tiny-sd15", build_sd15, TINY_SD15), ("tiny-sdxl", build_sdxl, TINY_SDXL)):
        if not (folder / name / "model_index.json").is_file():
            build(folder / name, **config)
        out.append(str(folder / name))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", action="append", default=None, help="a base folder or id (repeatable) "
                   "[embedded:tiny-teacher]")
    p.add_argument("--tiny-components", default=None, help="also build and measure tiny SD- and SDXL-shaped bases here")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch [1]")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bases = args.base or ["embedded:tiny-teacher"]
    if args.tiny_components:
        bases += tiny_bases(Path(args.tiny_components))
    rows = []
    print("| base | adapter | loss | fp32 mean loss | bf16 mean loss | relative difference |\n|---|---|---|---|---|---|")
    for base in bases:
        for adapter in ADAPTERS:
            for loss in LOSSES:
                pair = loss_pair(base, adapter, loss)
                fp32, bf16 = float(pair["fp32"].mean()), float(pair["bf16"].mean())
                rows.append(dict(base=base, adapter=adapter, loss=loss, fp32=fp32, bf16=bf16,
                                 relative_difference=abs(bf16 - fp32) / abs(fp32)))
                print(f"| {base} | {adapter} | {loss} | {fp32:.5f} | {bf16:.5f} | {rows[-1]['relative_difference']:.2%} |",
                      flush=True)
    timings = [dict(base=base, fp32_s=sampling_seconds(base, torch.float32), bf16_s=sampling_seconds(base, torch.bfloat16))
               for base in bases]
    print("\n| base | 8 images x 4 steps, fp32 (s) | bf16 (s) |\n|---|---|---|")
    for t in timings:
        print(f"| {t['base']} | {t['fp32_s']:.2f} | {t['bf16_s']:.2f} |")
    report = {"losses": rows, "sampling": timings, "threads": args.threads}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
