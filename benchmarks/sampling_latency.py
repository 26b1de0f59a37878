#!/usr/bin/env python
"""Sampling latency against the number of steps, measured in one run and reported as ratios.

Seconds per image of sampling plus VAE decoding, timed as ``condistill.evaluation.evaluate`` times a row
(condition encoding, sampling, decoding and the copy back to the CPU), for these rows:

* with ``--adapter``: the distilled student at 1, 2 and 4 steps (the CoDi sampler saved with
  the adapter, CFG 1) and the same base + adapter at 4 and 50 DDIM steps with classifier-free
  guidance (``--guidance``, default 4; CFG doubles the batch of every network call);
* without it: the base's teacher UNet for every row. The CoDi rows are then still run, with the
  teacher UNet on the CoDi scheduler: their images mean nothing, but their time is what a
  k-step sampler costs on the base network alone, so the ratios show the pure step-count
  and CFG saving without the adapter's overhead.

With ``--decoder SPEC`` (``embedded:tiny-decoder``, ``madebyollin/taesd``, a folder: see
``condistill.decoders``) each CoDi row is run a second time, named ``codi-<k>-fast``, decoding
with that TAESD-style fast decoder instead of the full VAE; the DDIM rows, the speed-up
reference among them, keep the full VAE. The table then gains a ``decoder`` column.

Every row samples the same batch (``--batch-size`` held-out synthetic scenes and captions).
Each row is first run ``--warmup`` times untimed, then the rows are timed in turn, one batch
of each per repeat, ``--repeats`` times, so that a change in machine load hits every row alike;
the median is reported. Speed-up is the 50-step DDIM + CFG row's seconds per image divided by
the row's. Prints a markdown table; ``--out`` also writes the JSON report.

    python benchmarks/sampling_latency.py --adapter runs/edge --batch-size 8 --repeats 5 --out latency.json
    python benchmarks/sampling_latency.py --adapter runs/edge --decoder embedded:tiny-decoder

For a base with no trained adapter (the random-weight SD-1.5-shaped folder of
``benchmarks/sd_components.py``), ``--untrained KIND`` builds a freshly initialised student of that
kind on the base and samples with it: a call costs the same whatever the weights, so the times are
those of a trained adapter. At that size a 50-step row takes minutes per image; ``--warmup-steps 1``
makes each warm-up run one step of its row (same shapes, guidance and decoder), not the whole row.

    python benchmarks/sampling_latency.py --base runs/sd15-random --untrained controlnet --batch-size 1 \
        --repeats 1 --warmup 1 --warmup-steps 1 --student-steps 4 --ddim-steps 50 --decoder runs/taesd-random
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from condistill.decoders import base_with_decoder
from condistill.frozen import load_base
from condistill.conditions import condition_from_config, get_condition
from condistill.data.dataset import ConditionDataset, collate
from condistill.data.sources import open_source
from condistill.adapters import available_adapters, build_student
from condistill.adapters.save_load import adapter_sampler, load_student, read_adapter_config
from condistill.config import DistillConfig
from condistill.method.sampler import sample_images
from condistill.method.guidance import make_model_fn

REFERENCE = "ddim-50-cfg"
FULL_VAE = "vae"


def row_specs(student_steps: list[int], ddim_steps: list[int], guidance: float, sampler: str = "codi",
              decoder: str | None = None) -> list[dict]:
    """The rows: CoDi (``sampler``: ``codi`` or ``codi-stochastic``) at each of ``student_steps``
    with CFG 1 (again with the fast ``decoder`` when one is given), DDIM at each of ``ddim_steps``
    with CFG; ``decoder`` of a row is ``"vae"`` (the full VAE) or the fast decoder's spec."""
    rows = [{"name": f"codi-{k}", "sampler": sampler, "steps": k, "guidance": 1.0, "decoder": FULL_VAE}
            for k in student_steps]
    if decoder is not None:
        rows += [{"name": f"codi-{k}-fast", "sampler": sampler, "steps": k, "guidance": 1.0, "decoder": decoder}
                 for k in student_steps]
    rows += [{"name": f"ddim-{k}-cfg", "sampler": "ddim", "steps": k, "guidance": guidance, "decoder": FULL_VAE}
             for k in ddim_steps]
    return rows


def make_runner(base, student, cond: torch.Tensor, prompts: list[str], row: dict, num_grid: int, seed: int):
    """A function sampling the whole batch once for ``row`` and returning the images on the CPU;
    ``run(steps)`` samples with ``steps`` steps instead of the row's (for a short warm-up)."""

    @torch.no_grad()
    def run(steps: int | None = None) -> torch.Tensor:
        c = cond.to(base.device)
        if student is None:
            fn = base.predict
        else:
            fn = make_model_fn(student, student.encode_condition(c), c.shape[0])
        images = sample_images(base, fn, prompts, steps or row["steps"], sampler=row["sampler"], num_grid=num_grid,
                               guidance_scale=row["guidance"], seed=seed).cpu()
        if base.device.type == "cuda":
            torch.cuda.synchronize()
        return images

    return run


def untrained_student(kind: str, condition: str, base):
    """``(condition, student, num_grid, sampler)``: a freshly initialised student of ``kind`` on ``base``
    (on its device, in eval mode) with a fresh run's defaults, the grid and sampler a recipe would export."""
    defaults = DistillConfig(adapter=kind, condition=condition)
    cond = get_condition(condition)
    student = build_student(kind, base, cond.channels).to(base.device).eval()
    return cond, student, defaults.num_grid, defaults.student_sampler


def heldout_batch(cond, batch_size: int, resolution: int, seed: int = 0) -> dict:
    """``batch_size`` held-out scenes with their ``cond`` conditions and captions (the batch every row samples)."""
    source = open_source(f"synthetic:heldout:{batch_size}", resolution=resolution)
    dataset = ConditionDataset(source, cond, resolution, seed=seed + 12345)
    return collate([dataset[i] for i in range(len(dataset))])


def markdown(report: dict) -> str:
    ref = next(r for r in report["rows"] if r["name"] == report["reference"])
    decoders = report.get("decoder") is not None
    extra = (" decoder |", "---|") if decoders else ("", "")
    lines = [f"| row | model | sampler | steps | CFG |{extra[0]} seconds/image | speed-up vs {ref['steps']}-step DDIM+CFG |",
             f"|---|---|---|---|---|{extra[1]}---|---|"]
    for r in report["rows"]:
        cell = f" {r['decoder']} |" if decoders else ""
        lines.append(f"| {r['name']} | {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} |{cell} "
                     f"{r['seconds_per_image']:.4f} | {r['speedup']:.1f}x |")
    return "\n".join(lines) + "\n"


def parse_steps(text: str) -> list[int]:
    steps = [int(s) for s in text.split(",") if s.strip()]
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive step counts, got {text!r}")
    return steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None,
                   help="diffusers folder or hub id (default: the adapter's recorded base, else embedded:tiny-teacher)")
    p.add_argument("--adapter", default=None, help="adapter folder (e.g. runs/edge); without it the teacher UNet runs every row")
    p.add_argument("--condition", default="edge", help="condition of the held-out batch when no adapter is given")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="sampling steps of each warm-up run (default: the row's own steps)")
    p.add_argument("--untrained", default=None, choices=available_adapters(), metavar="KIND",
                   help="without --adapter: time a freshly initialised student of this kind "
                        f"({', '.join(available_adapters())}) on --base, with --condition")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the DDIM rows")
    p.add_argument("--student-steps", type=parse_steps, default=[1, 2, 4], help="CoDi rows (CFG 1)")
    p.add_argument("--ddim-steps", type=parse_steps, default=[4, 50],
                   help="DDIM + CFG rows; the largest is the speed-up reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--decoder", default=None, metavar="SPEC",
                   help="also time the CoDi rows decoding with this fast decoder (embedded:tiny-decoder, a hub id "
                        "such as madebyollin/taesd, or an AutoencoderTiny folder)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    if args.warmup_steps is not None and args.warmup_steps < 1:
        p.error("--warmup-steps must be >= 1")
    if args.untrained and args.adapter:
        p.error("--untrained builds a student in place of --adapter's: pass one of them")
    if args.threads:
        torch.set_num_threads(args.threads)

    adapter_cfg = read_adapter_config(args.adapter) if args.adapter else None
    base_name = args.base or (adapter_cfg["base_name_or_path"] if adapter_cfg else "embedded:tiny-teacher")
    base = load_base(base_name, device=args.device)
    bases = {FULL_VAE: base}
    if args.decoder is not None:
        try:
            bases[args.decoder] = base_with_decoder(base, args.decoder)
        except (FileNotFoundError, ValueError, TypeError) as error:
            p.error(f"--decoder {args.decoder}: {error}")
    if adapter_cfg:
        cond = condition_from_config(adapter_cfg["condition_config"])
        student = load_student(args.adapter, base).to(base.device).eval()
        num_grid, sampler = adapter_cfg["num_grid"], adapter_sampler(args.adapter)
    elif args.untrained:
        cond, student, num_grid, sampler = untrained_student(args.untrained, args.condition, base)
    else:
        cond, student, num_grid, sampler = get_condition(args.condition), None, 50, "codi"
    data = heldout_batch(cond, args.batch_size, base.resolution, args.seed)

    model = "teacher" if student is None else ("adapter" if args.adapter else f"untrained {args.untrained}")
    # the student samples as its adapter asks (re-noising or not); the cost is the same either way
    rows = row_specs(args.student_steps, args.ddim_steps, args.guidance, sampler, args.decoder)
    reference = f"ddim-{max(args.ddim_steps)}-cfg"
    runners = [make_runner(bases[row["decoder"]], student, data["conditioning"], list(data["caption"]), row, num_grid, args.seed)
               for row in rows]
    for run in runners:
        for _ in range(args.warmup):
            run(args.warmup_steps)
    times = [[] for _ in rows]
    for _ in range(args.repeats):
        for run, ts in zip(runners, times):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)

    results = []
    for row, ts in zip(rows, times):
        results.append({**row, "model": model, "seconds_per_image": statistics.median(ts) / args.batch_size,
                        "seconds_per_batch_all": ts})
    ref_spi = next(r for r in results if r["name"] == reference)["seconds_per_image"]
    for r in results:
        r["speedup"] = ref_spi / max(r["seconds_per_image"], 1e-12)
    report = {"device": str(base.device), "base": str(base_name), "adapter": args.adapter, "batch_size": args.batch_size,
              "repeats": args.repeats, "warmup": args.warmup, "warmup_steps": args.warmup_steps,
              "untrained": args.untrained, "threads": torch.get_num_threads(), "decoder": args.decoder,
              "num_grid": num_grid, "reference": reference, "rows": results}
    print(markdown(report), end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
