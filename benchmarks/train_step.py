#!/usr/bin/env python
"""Time and memory of one distillation step against one conventional adapter step.

Both steps use the same base, adapter, batch and device; each is warmed up, then timed over
``--steps`` optimizer steps. On CUDA the peak allocated memory of each step is reported. On
the CPU each kind of step runs in its own fresh Python process (the script re-runs itself with
``--only``) and the peak resident set of that whole process is reported: a process's maximum
RSS only grows, so one process running both steps could not tell them apart.

    python benchmarks/train_step.py --adapter controlnet --batch-size 32 --steps 10
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
from condistill.training.objective import DTYPES, build_objective
from condistill.adapters import build_student
from condistill.frozen import load_base
from condistill.conditions import get_condition


def run(loss: str, args, base, batch) -> dict:
    cfg = DistillConfig(condition=args.condition, adapter=args.adapter, base=args.base, loss=loss,
                        batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                        guidance_min=args.guidance_max if args.guidance_max > 1 else 1.0,
                        guidance_max=args.guidance_max, output_dir="/tmp/unused")
    device = base.device
    student = build_student(args.adapter, base, get_condition(args.condition).channels).to(device)
    params = student.trainable_named_parameters()
    opt = torch.optim.AdamW(params.values(), lr=1e-5)
    ema = EMA(params)
    objective = build_objective(cfg, student, student, ema, base)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.mixed_precision], enabled=args.mixed_precision != "no")

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


def _in_fresh_process(loss: str) -> dict:
    """Re-run this script for one kind of step only and read its JSON line."""
    argv = [a for a in sys.argv[1:]]
    res = subprocess.run([sys.executable, __file__, *argv, "--only", loss], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"the {loss} benchmark process failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="embedded:tiny-teacher")
    p.add_argument("--condition", default="edge")
    p.add_argument("--adapter", default="controlnet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--guidance-max", type=float, default=1.0, help=">1 benchmarks CFG-aware distillation")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", choices=["diffusion", "codi"], default=None,
                   help="run one kind of step and print its figures as one JSON line (used on the CPU)")
    args = p.parse_args()
    if args.device == "cpu" and args.only is None:
        conventional, codi = _in_fresh_process("diffusion"), _in_fresh_process("codi")
        report = {"device": "cpu", "adapter": args.adapter, "batch_size": args.batch_size,
                  "mixed_precision": args.mixed_precision, "separate_processes": True,
                  "conventional": conventional, "codi": codi,
                  "time_ratio": codi["seconds_per_step"] / conventional["seconds_per_step"],
                  "memory_ratio": codi["peak_rss_mib"] / conventional["peak_rss_mib"]}
        print(json.dumps(report, indent=2))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.base, device=args.device, dtype=DTYPES[args.mixed_precision])
    cond = get_condition(args.condition)
    ds = ConditionDataset(open_source(f"synthetic:train:{args.batch_size}", resolution=base.resolution), cond,
                          base.resolution)
    batch = collate([ds[i] for i in range(args.batch_size)])
    if args.only:
        print(json.dumps(run(args.only, args, base, batch)))
        return
    # the conventional step runs first so the distillation step cannot benefit from its warm caches
    conventional = run("diffusion", args, base, batch)
    codi = run("codi", args, base, batch)
    report = {"device": str(args.device), "adapter": args.adapter, "batch_size": args.batch_size,
              "mixed_precision": args.mixed_precision, "conventional": conventional, "codi": codi,
              "time_ratio": codi["seconds_per_step"] / conventional["seconds_per_step"]}
    key = "peak_memory_gib" if "peak_memory_gib" in codi else "peak_rss_growth_mib"
    report["memory_ratio"] = codi[key] / conventional[key] if conventional[key] > 0 else None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
