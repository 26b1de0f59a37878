#!/usr/bin/env python
"""One prepared GPU check: the training step of the GPU presets and few-step sampling latency, at full size.

Everything runs on random-weight SD-1.5- and SDXL-base-1.0-shaped components built locally by
``benchmarks/sd_components.py`` (no download), so the seconds and gigabytes are those of the real
models. On a CUDA machine, from the repository root:

    python benchmarks/gpu_check.py --out docs/benchmarks/gpu --deadline-s 480

The whole run, imports and component builds included, ends within ``--deadline-s`` seconds (default
480). Each result is written to ``gpu_check.json`` and ``gpu_check.md`` in the ``--out`` folder (or
to ``--out FILE.json`` and the ``.md`` beside it) as soon as it is measured; both files are rewritten
atomically after every change, so a run cut off by the deadline or killed still reports what it got.
A case that would start after the deadline is recorded as skipped with the reason; the case running
when the deadline passes is recorded as cut off and the run stops (exit status 3). A case that
fails (an out-of-memory error, say) is recorded with its error and traceback, and the others go on.

The cases, most important first:

1. the ``sd15-gpu`` preset's training step (read from ``condistill.presets.RECIPES["edge"]``: 512 px,
   batch 8, gradient checkpointing, guidance drawn in [1, 4]) with the ControlNet and the ``codi`` loss
   in bf16; then the same in fp16 (the preset's own precision); then bf16 without gradient checkpointing;
2. the same preset, bf16, for each adapter kind (ControlNet, T2I-Adapter, LoRA) with ``codi+dmd``,
   and with ``codi`` for the T2I-Adapter and the LoRA (the LoRA's ``codi+dmd`` without gradient
   checkpointing, which condistill refuses for that pair);
3. per-image sampling latency, batch 1, 512 px, fp16, of an untrained ControlNet student (a call costs
   the same whatever the weights): 50 DDIM steps with CFG 4 (the reference), then the student at 1 and 4
   steps, decoded by the full VAE and by a TAESD-shaped decoder;
4. the ``sdxl-gpu`` preset's step (1024 px, batch 4, bf16) with the ControlNet and ``codi`` on the
   SDXL-shaped components: last, because they take the longest to build.

A training case is ``benchmarks/train_step.py``'s step (:func:`train_step.run`): the objective of
``condistill.training.objective.build_objective`` on the frozen base loaded in the case's precision,
its forward inside ``torch.autocast`` of that precision, fp32 trainable weights, AdamW and the EMA
update; ``--warmup-steps`` untimed steps, then the mean of ``--train-steps`` timed ones. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (reset before each case and after its
warm-up). Each case loads its base afresh (a LoRA student and the fake score of ``codi+dmd`` add
layers to the base's UNet). A sampling row is timed as ``benchmarks/sampling_latency.py`` times one:
one untimed one-step pass, then the median of ``--sampling-repeats`` passes.

``--tiny`` runs every case on tiny components of the same layouts, on the CPU in a few seconds each
(in bf16; the fp16 training case is recorded as skipped there, 'fp16 needs CUDA', and sampling runs
in bf16 on the CPU); the test suite runs it so that this script cannot rot unnoticed.

Built components are kept in ``--components`` (default ``runs/gpu-check-components``, or its ``tiny``
subfolder) and reused by the next run when their configuration is unchanged; the first full-size run
builds them on the GPU (about 2 GB for SD 1.5 and 7 GB for SDXL, saved in fp16). ``--only ID,...``
runs the named cases alone (the ids are the first column of the tables).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

_T0 = time.monotonic()  # the deadline counts from here: the heavy imports and the builds are part of the run

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts
import sampling_latency  # noqa: E402
import sd_components  # noqa: E402
import train_step  # noqa: E402

from condistill.conditions import get_condition  # noqa: E402
from condistill.config import DistillConfig  # noqa: E402
from condistill.presets import RECIPES  # noqa: E402
from condistill.training.objective import DTYPES  # noqa: E402

CONDITION = "edge"
SAMPLE_ADAPTER = "controlnet"
TINY_BATCH = 2
CUT_OFF_STATUS = 3  # exit status when the deadline stopped a case mid-way
LORA_DMD_NOTE = ("gradient checkpointing off: condistill refuses codi+dmd for a LoRA student with gradient "
                 "checkpointing (the checkpointed UNet would keep the student's LoRA on in the teacher's calls)")


@dataclass(frozen=True)
class Case:
    """One measurement: a training step (``kind="train"``) or one sampling row (``kind="sample"``)."""

    id: str
    kind: str
    base: str  # which components: "sd15" or "sdxl"
    precision: str
    preset: str | None = None
    adapter: str = SAMPLE_ADAPTER
    loss: str | None = None
    checkpointing: bool | None = None  # None: the preset's
    row: dict | None = None  # a sampling_latency row spec
    note: str | None = None


def preset(name: str) -> dict:
    """The ``edge`` recipe's preset ``name``, as ``condistill train edge --preset NAME`` starts from it."""
    return {k: v for k, v in RECIPES[CONDITION][1][name].items() if not k.startswith("_")}


def checkpointing(case: Case) -> bool:
    """Whether a training case checkpoints gradients: as its preset says unless the case says otherwise."""
    if case.checkpointing is not None:
        return case.checkpointing
    return bool(preset(case.preset).get("gradient_checkpointing", False))


def all_cases() -> list[Case]:
    """Every case, in the order they run (most important first)."""
    def train(base, preset_name, adapter, loss, precision, checkpointing=None, note=None):
        suffix = "" if checkpointing is None else ("/ckpt" if checkpointing else "/no-ckpt")
        return Case(f"{base}/{adapter}/{loss}/{precision}{suffix}", "train", base, precision, preset_name, adapter,
                    loss, checkpointing, note=note)

    cases = [train("sd15", "sd15-gpu", "controlnet", "codi", "bf16"),
             train("sd15", "sd15-gpu", "controlnet", "codi", "fp16"),
             train("sd15", "sd15-gpu", "controlnet", "codi", "bf16", checkpointing=False),
             train("sd15", "sd15-gpu", "controlnet", "codi+dmd", "bf16")]
    cases += [train("sd15", "sd15-gpu", "t2i_adapter", "codi", "bf16"),
              train("sd15", "sd15-gpu", "t2i_adapter", "codi+dmd", "bf16"),
              train("sd15", "sd15-gpu", "lora", "codi", "bf16"),
              train("sd15", "sd15-gpu", "lora", "codi+dmd", "bf16", checkpointing=False, note=LORA_DMD_NOTE)]
    sampler = DistillConfig(adapter=SAMPLE_ADAPTER, condition=CONDITION).student_sampler
    rows = sampling_latency.row_specs([1, 4], [50], 4.0, sampler, decoder="taesd")
    rows.sort(key=lambda r: r["sampler"] != "ddim")  # the reference first: every speed-up needs it
    cases += [Case(f"sd15/sample/{r['name']}", "sample", "sd15", "fp16", row=r) for r in rows]
    cases.append(train("sdxl", "sdxl-gpu", "controlnet", "codi", "bf16"))
    return cases


# ---- the report -------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _gib(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _status_cell(row: dict) -> str:
    if row["status"] == "ok":
        return "ok"
    if row["status"] == "running":
        return "did not finish (killed while running)"
    if row["status"] == "pending":
        return "not started yet"
    text = row.get("reason") or row.get("error") or ""
    return f"{row['status']}: {text.splitlines()[0] if text else ''}".replace("|", "\\|")


def _num(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    """The report as markdown: what ran where, then one table of training steps and one of sampling rows."""
    d, v = report["device"], report["versions"]
    state = {"done": "finished", "cut_off": "cut off by the deadline", "killed": "killed",
             "running": "running (or killed before it could say so)"}[report["state"]]
    lines = [f"# GPU check ({report['mode']})", "",
             f"- device: {d['name']} ({d['type']}{', %.1f GiB' % d['memory_gib'] if d.get('memory_gib') else ''})",
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "diffusers", "transformers",
                                                                "accelerate", "condistill") if v.get(k)),
             f"- command: `{report['command']}`" + (f" (commit {report['commit'][:12]})" if report.get("commit") else ""),
             f"- {state}: {report['elapsed_s']:.0f} s of the {report['deadline_s']:g} s deadline",
             ""]
    if report["setup"]:
        lines += ["| components | status | seconds |", "|---|---|---|"]
        for s in report["setup"]:
            status = s["status"] + (f": {s['error'].splitlines()[0]}" if s.get("error") else "")
            if s.get("gpu_build_error"):
                status += f" (on the CPU; on the GPU: {s['gpu_build_error'].splitlines()[0]})"
            lines.append(f"| {s['name']} | {status.replace('|', '/')} | {_num(s, 'seconds', '.1f')} |")
        lines.append("")
    train = [r for r in report["cases"] if r["kind"] == "train"]
    sample = [r for r in report["cases"] if r["kind"] == "sample"]
    lines += ["## Training step", "",
              "| case | preset | adapter | loss | precision | grad. ckpt | px x batch | s/step | images/s | "
              "peak GiB | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in train:
        size = f"{r['resolution']} x {r['batch_size']}" if r.get("resolution") else "-"
        lines.append(f"| {r['id']} | {r['preset']} | {r['adapter']} | {r['loss']} | {r['precision']} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {size} | {_num(r, 'seconds_per_step', '.3f')} | "
                     f"{_num(r, 'images_per_second', '.2f')} | {_gib(r.get('peak_memory_gib'))} | {_status_cell(r)} |")
    lines += [f"\n- {r['id']}: {r['note']}" for r in train if r.get("note")]
    lines += ["", "## Sampling latency (batch 1)", "",
              "| case | model | steps | CFG | decoder | precision | px | s/image | speed-up vs 50-step DDIM+CFG | "
              "peak GiB | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sample:
        speedup = "-" if r.get("speedup") is None else f"{r['speedup']:.1f}x"
        lines.append(f"| {r['id']} | {r['model']} | {r['steps']} | {r['guidance']:g} | {r['decoder']} | {r['precision']} | "
                     f"{r.get('resolution') or '-'} | {_num(r, 'seconds_per_image', '.4f')} | {speedup} | "
                     f"{_gib(r.get('peak_memory_gib'))} | {_status_cell(r)} |")
    return "\n".join(lines) + "\n"


class Report:
    """The run's JSON + markdown, rewritten atomically after every change (one lock: the deadline's
    watchdog thread and a signal handler may write too)."""

    def __init__(self, json_path: Path, md_path: Path, data: dict):
        self.json_path, self.md_path, self.data = json_path, md_path, data
        self.lock = threading.RLock()

    @property
    def rows(self) -> list[dict]:
        return self.data["cases"]

    def write(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = time.monotonic() - _T0
            self.data["updated"] = _now()
            _speedups(self.rows)
            _atomic_write(self.json_path, json.dumps(self.data, indent=2) + "\n")
            _atomic_write(self.md_path, markdown(self.data))

    def update(self, row: dict, **fields) -> None:
        with self.lock:
            row.update(fields)
            self.write()

    def stop(self, state: str, running_error: str, pending_reason: str) -> bool:
        """Close the report: a running case becomes an error, every pending one a skip; True if one was running.

        Nothing changes once the report is closed (a deadline and the run's own end can meet)."""
        with self.lock:
            cut = False
            if self.data["state"] != "running":
                return cut
            for row in self.rows:
                if row["status"] == "running":
                    row.update(status="error", error=running_error.format(row=row, elapsed=time.monotonic() - _T0))
                    cut = True
                elif row["status"] == "pending":
                    row.update(status="skipped", reason=pending_reason)
            self.data["state"] = state
            self.write()
            return cut


def _speedups(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["kind"] == "sample" and r["sampler"] == "ddim" and r["status"] == "ok"), None)
    for r in rows:
        if r["kind"] == "sample":
            ok = ref is not None and r["status"] == "ok"
            r["speedup"] = ref["seconds_per_image"] / max(r["seconds_per_image"], 1e-12) if ok else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("diffusers", "transformers", "accelerate", "condistill"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _device_info(device: str) -> dict:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"type": "cuda", "name": props.name, "memory_gib": props.total_memory / 2**30,
                "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_precision(case: Case, cuda: bool) -> str:
    """The precision ``case`` runs in: its own, but sampling runs in bf16 on the CPU (--tiny), where fp16
    is not worth timing, so that its code path is still checked there."""
    return "bf16" if case.kind == "sample" and not cuda else case.precision


def _row(case: Case, cuda: bool) -> dict:
    row = {"id": case.id, "kind": case.kind, "base": case.base, "precision": run_precision(case, cuda),
           "status": "pending"}
    if case.kind == "train":
        row.update(preset=case.preset, adapter=case.adapter, loss=case.loss, gradient_checkpointing=checkpointing(case),
                   preset_options=preset(case.preset), note=case.note)
    else:
        r = case.row
        row.update(model=f"untrained {case.adapter}", sampler=r["sampler"], steps=r["steps"], guidance=r["guidance"],
                   decoder="full VAE" if r["decoder"] == sampling_latency.FULL_VAE else "TAESD-shaped", batch_size=1)
    return row


# ---- components ---------------------------------------------------------------------------------------


class Components:
    """The random-weight component folders, built on first use (and kept for the next run when their
    configuration is unchanged); each build is a setup row of the report."""

    def __init__(self, root: Path, tiny: bool, device: str, report: Report):
        self.root, self.tiny, self.device, self.report = root, tiny, device, report
        self.done: dict[str, Path | str] = {}  # name -> folder, or the error that stopped its build

    def _spec(self, name: str):
        t = self.tiny
        if name == "sd15":
            return sd_components.build_sd15, dict(sd_components.TINY_SD15) if t else {}
        if name == "sdxl":
            return sd_components.build_sdxl, dict(sd_components.TINY_SDXL) if t else {}
        return sd_components.build_taesd, dict(sd_components.TINY_TAESD) if t else {}

    def path(self, name: str) -> Path:
        if name not in self.done:
            self.done[name] = self._build(name)
        if isinstance(self.done[name], str):
            raise RuntimeError(f"the {name} components could not be built: {self.done[name]}")
        return self.done[name]

    def _build(self, name: str) -> Path | str:
        build, config = self._spec(name)
        # full size: the weights are drawn on the GPU and saved in fp16 (half the disk and load time)
        if not self.tiny and name != "taesd":
            config.update(device=self.device, dtype=torch.float16)
        stamp = json.dumps({"builder": build.__name__, "config": config}, sort_keys=True, default=str)
        out = self.root / name
        setup = {"name": name, "status": "building", "seconds": None}
        with self.report.lock:
            self.report.data["setup"].append(setup)
            self.report.write()
        t0 = time.perf_counter()
        try:
            if (out / "gpu_check_build.json").is_file() and (out / "gpu_check_build.json").read_text() == stamp:
                self.report.update(setup, status="reused", seconds=time.perf_counter() - t0)
                return out
            partial = self.root / f"{name}.partial"
            for stale in (partial, out):
                if stale.exists():
                    shutil.rmtree(stale)
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                build(partial, **config)
            except Exception as error:  # noqa: BLE001 - drawing on the GPU is only the fast way
                if config.get("device", "cpu") == "cpu":
                    raise
                setup["gpu_build_error"] = f"{type(error).__name__}: {error}"
                shutil.rmtree(partial, ignore_errors=True)
                _free()
                build(partial, **dict(config, device="cpu"))  # same configs and seed, drawn on the CPU
            (partial / "gpu_check_build.json").write_text(stamp)
            os.replace(partial, out)
            _free()
            if torch.cuda.is_available():  # a build on the GPU is no part of the case that asked for it
                torch.cuda.reset_peak_memory_stats()
            self.report.update(setup, status="built", seconds=time.perf_counter() - t0)
            return out
        except Exception as error:  # noqa: BLE001 - recorded, the cases that need it say so
            message = f"{type(error).__name__}: {error}"
            self.report.update(setup, status="error", error=message, traceback=_tail(traceback.format_exc()),
                               seconds=time.perf_counter() - t0)
            return message


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---- the cases ----------------------------------------------------------------------------------------


class Runner:
    def __init__(self, args, components: Components):
        self.args, self.components = args, components
        self.cuda = args.device.startswith("cuda")
        self.sampling = None  # the sampling rows' shared base, student and batch

    def skip_reason(self, case: Case) -> str | None:
        if run_precision(case, self.cuda) == "fp16" and not self.cuda:
            return "fp16 needs CUDA"
        return None

    def measure(self, case: Case) -> dict:
        if case.kind != "sample":
            self.sampling = None  # the sampling rows' models leave before a training case loads its own
            _free()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self.train(case) if case.kind == "train" else self.sample(case)

    def train(self, case: Case) -> dict:
        from condistill.frozen import load_base, native_resolution

        options = preset(case.preset)
        path = self.components.path(case.base)
        if self.args.tiny:
            resolution, batch_size = native_resolution(path), TINY_BATCH
        else:
            resolution, batch_size = options["resolution"], options["batch_size"]
        argv = ["--base", str(path), "--condition", CONDITION, "--adapter", case.adapter,
                "--batch-size", str(batch_size), "--resolution", str(resolution), "--device", self.args.device,
                "--steps", str(self.args.train_steps), "--warmup", str(self.args.warmup_steps),
                "--mixed-precision", case.precision, "--guidance-min", str(options.get("guidance_min", 1.0)),
                "--guidance-max", str(options.get("guidance_max", 1.0))]
        args = train_step.parser().parse_args(argv + (["--gradient-checkpointing"] if checkpointing(case) else []))
        base = load_base(path, device=self.args.device, dtype=DTYPES[case.precision])
        condition = get_condition(CONDITION, **options.get("condition_options", {}))
        batch = train_step.synthetic_batch(condition, batch_size, resolution)
        figures = train_step.run(case.loss, args, base, batch)
        return {"resolution": resolution, "batch_size": batch_size, "guidance": [args.guidance_min, args.guidance_max],
                "warmup_steps": args.warmup, "timed_steps": args.steps, "autocast_dtype": str(DTYPES[case.precision]),
                **figures}

    def _sampling_models(self, precision: str):
        if self.sampling is None:
            from condistill.decoders import base_with_decoder
            from condistill.frozen import load_base

            base = load_base(self.components.path("sd15"), device=self.args.device, dtype=DTYPES[precision])
            bases = {sampling_latency.FULL_VAE: base, "taesd": base_with_decoder(base, self.components.path("taesd"))}
            cond, student, num_grid, _ = sampling_latency.untrained_student(SAMPLE_ADAPTER, CONDITION, base)
            student.to(dtype=base.dtype)  # the adapter in the base's precision, as a deployed pipeline runs it
            data = sampling_latency.heldout_batch(cond, 1, base.resolution)
            self.sampling = dict(bases=bases, student=student, data=data, num_grid=num_grid)
        return self.sampling

    def sample(self, case: Case) -> dict:
        s = self._sampling_models(run_precision(case, self.cuda))
        row = case.row
        base = s["bases"][row["decoder"]]
        run = sampling_latency.make_runner(base, s["student"], s["data"]["conditioning"], list(s["data"]["caption"]),
                                           row, s["num_grid"], seed=0)
        run(1)  # warm-up: one step of the row (same shapes, guidance and decoder)
        times = []
        for _ in range(self.args.sampling_repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        out = {"resolution": base.resolution, "num_grid": s["num_grid"], "seconds_per_image": statistics.median(times),
               "seconds_all": times}
        out["images_per_second"] = 1 / max(out["seconds_per_image"], 1e-12)
        if self.cuda:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


# ---- the run ----------------------------------------------------------------------------------------------


def _paths(out: str) -> tuple[Path, Path]:
    out = Path(out)
    if out.suffix == ".json":
        return out, out.with_suffix(".md")
    return out / "gpu_check.json", out / "gpu_check.md"


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-check",
                   help="folder of gpu_check.json and gpu_check.md, or the .json file (the .md goes beside it)")
    p.add_argument("--deadline-s", type=float, default=480.0,
                   help="the whole run ends within this many seconds, imports and builds included")
    p.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps per training case")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before them")
    p.add_argument("--sampling-repeats", type=int, default=3, help="timed passes per sampling row (the median is kept)")
    p.add_argument("--components", default=None,
                   help="where the random-weight components are built and kept [runs/gpu-check-components, "
                        "with --tiny its tiny/ subfolder]")
    p.add_argument("--tiny", action="store_true", help="every case on tiny components (a few seconds each on a CPU)")
    p.add_argument("--only", default=None, metavar="ID,...", help="run only these cases (ids as in the tables)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0: its default)")
    args = p.parse_args(argv)
    if not args.tiny and not args.device.startswith("cuda"):
        p.error("the full-size cases need a CUDA GPU; --tiny runs every case on tiny components on the CPU")
    if args.train_steps < 1 or args.warmup_steps < 0 or args.sampling_repeats < 1:
        p.error("--train-steps and --sampling-repeats must be >= 1, --warmup-steps >= 0")
    cases = all_cases()
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {c.id for c in cases})
        if unknown:
            p.error(f"--only: unknown case(s) {unknown}; the cases are {[c.id for c in cases]}")
        cases = [c for c in cases if c.id in wanted]
    if args.components is None:
        args.components = "runs/gpu-check-components" + ("/tiny" if args.tiny else "")
    return args, cases


def main(argv: list[str] | None = None) -> int:
    args, cases = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path, md_path = _paths(args.out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])])
    report = Report(json_path, md_path, {
        "mode": "tiny" if args.tiny else "full size", "state": "running", "command": command,
        "started": _now(), "updated": None, "elapsed_s": 0.0, "deadline_s": args.deadline_s, "commit": _commit(),
        "device": _device_info(args.device), "versions": _versions(), "condition": CONDITION,
        "train_steps": args.train_steps, "warmup_steps": args.warmup_steps, "sampling_repeats": args.sampling_repeats,
        "setup": [], "cases": [_row(c, args.device.startswith("cuda")) for c in cases],
    })
    report.write()
    deadline = args.deadline_s

    def cut_off() -> None:
        cut = report.stop("cut_off", "cut off by the deadline ({elapsed:.0f} s)", "the deadline passed before it started")
        os._exit(CUT_OFF_STATUS if cut else 0)

    def killed(signum, _frame) -> None:
        report.stop("killed", f"killed by signal {signum} after {{elapsed:.0f}} s", f"killed by signal {signum} first")
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, killed)
    watchdog = threading.Timer(max(0.0, deadline - (time.monotonic() - _T0)), cut_off)
    watchdog.daemon = True
    watchdog.start()

    runner = Runner(args, Components(Path(args.components), args.tiny, args.device, report))
    for case, row in zip(cases, report.rows):
        elapsed = time.monotonic() - _T0
        if elapsed >= deadline:
            report.update(row, status="skipped", reason=f"the deadline ({deadline:g} s) passed before it started")
            continue
        reason = runner.skip_reason(case)
        if reason:
            report.update(row, status="skipped", reason=reason)
            continue
        report.update(row, status="running", started_at_s=elapsed)
        t0, error = time.perf_counter(), None
        try:
            figures = runner.measure(case)
        except Exception as exc:  # noqa: BLE001 - one failure (an OOM, say) is a row; the rest go on
            error = (f"{type(exc).__name__}: {exc}", _tail(traceback.format_exc()))
        if error is None:
            report.update(row, status="ok", wall_seconds=time.perf_counter() - t0, **figures)
        else:
            runner.sampling = None
            _free()  # after the traceback is gone, so the memory its frames held is released too
            report.update(row, status="error", error=error[0], traceback=error[1], wall_seconds=time.perf_counter() - t0)
        print(f"{row['id']}: {_status_cell(row)}", file=sys.stderr, flush=True)
    watchdog.cancel()
    report.stop("done", "", "")
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
