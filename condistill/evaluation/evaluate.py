"""Side-by-side evaluation of distilled students and baselines on held-out scenes
(``--data``, the user's own images: :mod:`condistill.evaluation.user_data`).

Every row samples the same held-out scenes with the same seeds in one process and is
scored with the same metrics:

- fidelity to the condition: edge F1 of canny(output) against the input edges (edge),
  depth error of the judge's depth estimate against the input depth (depth), PSNR/SSIM
  against the ground truth (sr), PSNR inside the hole (inpaint);
- realism: Frechet distance of judge features against the real held-out images;
- prompt adherence: the judge's background + main-colour accuracy against the prompt;
- wall-clock seconds per image (sampling and VAE decoding, batch as given), after a warm-up
  batch; rows cheaper than ``TIMING_SECONDS`` are timed over several passes and the median
  pass counts;
- optional, only when their packages and weights are already on the machine (never
  downloaded; see :mod:`condistill.evaluation.third_party`): LPIPS against the ground truth (sr,
  inpaint) and FID on Inception features. Skipped ones are listed with the reason in
  ``report["skipped_metrics"]`` and under the table in ``results.md``.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from condistill.frozen import load_base
from condistill.conditions import condition_class, condition_from_config, get_condition
from condistill.data.dataset import ConditionDataset, collate
from condistill.data.sources import open_source
from condistill.adapters.save_load import adapter_sampler, load_student, read_adapter_config
from condistill.evaluation.plain_adapter import load_plain_adapter, plain_adapter_kind
from condistill.plots import grid, to_pil
from condistill.method.sampler import CODI_SAMPLERS, sample_images, start_latents
from condistill.method.guidance import make_model_fn

# A row's latency is the median over passes of sampling all its images: passes are repeated
# while their total stays under TIMING_SECONDS, at most MAX_TIMING_PASSES of them.
TIMING_SECONDS = 10.0
MAX_TIMING_PASSES = 5
SAMPLERS = (*CODI_SAMPLERS, "ddim", "lcm")
def fidelity_metric(condition_name: str) -> tuple[str, str] | None:
    """The fidelity metric of a registered condition and whether higher or lower is better (its class says)."""
    return condition_class(condition_name).fidelity


@dataclass
class RowSpec:
    """One row of the table: what to sample and how.

    ``model`` is an adapter folder, ``"teacher"`` (the base without adapter) or ``"bicubic"``
    (sr only: the up-scaled low-resolution input itself). ``start`` (a grid timestep, CoDi
    samplers only) starts sampling from the condition's own image noised to that timestep
    (``Condition.start_image``: sr, inpaint), or from the zero latent noised to it (edge, depth),
    instead of from pure noise.
    """

    name: str
    model: str
    sampler: str = "codi"  # codi | codi-stochastic | ddim | lcm
    steps: int = 4
    guidance: float = 1.0
    start: int | None = None
    lcm_lora: bool = False  # sampled with the LCM-LoRA of ``evaluate(lcm_lora=...)`` switched on


@dataclass
class RowResult:
    name: str
    model: str
    sampler: str
    steps: int
    guidance: float
    metrics: dict = field(default_factory=dict)
    start: int | None = None
    lcm_lora: bool = False

    @classmethod
    def of(cls, spec: RowSpec, metrics: dict) -> "RowResult":
        return cls(spec.name, spec.model, spec.sampler, spec.steps, spec.guidance, metrics, spec.start, spec.lcm_lora)


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def generate_row(spec: RowSpec, base, data: dict, batch_size: int, seed: int, students: dict,
              cache_dir: str | Path | None = None, condition=None, lcm_scale: float | None = None
              ) -> tuple[torch.Tensor, float]:
    """Sample one row; teacher rows are cached in ``cache_dir`` (they ignore the condition).

    ``condition`` (the :class:`~condistill.conditions.Condition`) gives the start images of a row
    with ``spec.start``; ``lcm_scale`` is the weight of the LCM-LoRA loaded into ``base.unet``
    (:mod:`condistill.evaluation.lcm_lora`), switched on for a row with ``spec.lcm_lora``."""
    if spec.lcm_lora:
        if lcm_scale is None:
            raise ValueError(f"row {spec.name!r} samples with an LCM-LoRA: pass one (--lcm-lora)")
        from condistill.adapters.lora import stacked_lora
        from condistill.evaluation.lcm_lora import LCM_LORA_NAME

        with stacked_lora(base.unet, LCM_LORA_NAME, lcm_scale):
            return generate_row(replace(spec, lcm_lora=False), base, data, batch_size, seed, students, None,
                                condition)
    cond, prompts = data["conditioning"], data["caption"]
    if spec.start is not None and condition is None:
        raise ValueError(f"row {spec.name!r} starts from the condition's image: pass its condition to generate_row")
    n = cond.shape[0]
    if spec.model == "bicubic":
        t0 = time.perf_counter()
        out = cond[:, :3].clone()
        return out, (time.perf_counter() - t0) / n
    if spec.model == "teacher" and cache_dir is not None and spec.start is None:
        size = [] if tuple(cond.shape[-2:]) == (base.resolution,) * 2 else [list(cond.shape[-2:])]
        key = hashlib.sha256(json.dumps([str(base.name_or_path), list(prompts), spec.sampler, spec.steps,
                                         spec.guidance, seed, batch_size, *size]).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"teacher-{key}.safetensors"
        if path.is_file():
            saved = load_file(str(path))
            return saved["images"], float(saved["seconds_per_image"])
        images, latency = generate_row(spec, base, data, batch_size, seed, students, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous(), "seconds_per_image": torch.tensor(latency, dtype=torch.float64)}, str(path))
        return images, latency
    student = students.get(spec.model)
    plain = spec.model != "teacher" and plain_adapter_kind(spec.model) is not None
    if student is None and spec.model != "teacher":
        loaded = load_plain_adapter(spec.model, base, condition) if plain else load_student(spec.model, base)
        student = students[spec.model] = loaded.to(base.device).eval()
    num_grid = read_adapter_config(spec.model)["num_grid"] if student is not None and not plain else 50

    def run(sl: slice) -> torch.Tensor:
        c = cond[sl].to(base.device)
        if student is None:
            fn = base.predict  # the frozen teacher, whatever form its text conditioning takes
        else:
            fn = make_model_fn(student, student.encode_condition(c), c.shape[0])
        init = None if spec.start is None else start_latents(base, condition, c)
        images = sample_images(base, fn, prompts[sl], spec.steps, sampler=spec.sampler, num_grid=num_grid,
                               guidance_scale=spec.guidance, seed=seed + sl.start, init_latents=init,
                               start_timestep=spec.start, size=tuple(c.shape[-2:])).cpu()
        if base.device.type == "cuda":
            torch.cuda.synchronize()
        return images

    run(slice(0, min(2, n)))  # warm-up: neither timed nor kept
    batches = list(_batches(n, batch_size))
    outs, passes = [], []
    t0 = time.perf_counter()
    for sl in batches:
        outs.append(run(sl))
    passes.append(time.perf_counter() - t0)
    # Cheap rows (few steps) are timed again over the same batches, so that one noisy pass
    # (allocator growth, a background process) cannot decide their latency: the median counts.
    while sum(passes) < TIMING_SECONDS and len(passes) < MAX_TIMING_PASSES:
        t0 = time.perf_counter()
        for sl in batches:
            run(sl)
        passes.append(time.perf_counter() - t0)
    return torch.cat(outs), statistics.median(passes) / n


def score(condition_name: str, images: torch.Tensor, data: dict, judge, real_features: torch.Tensor,
          condition=None) -> dict:
    """All metrics of generated ``images [N,3,H,W]`` in [0,1] against the held-out ``data``."""
    from condistill.evaluation import metrics

    real = (data["pixel_values"] + 1) / 2
    out = {
        "frechet_distance": float(metrics.frechet_distance(judge.features(images), real_features)),
        "prompt_accuracy": float(judge.score(images, data["caption"])["both"]),
    }
    if condition is None:
        condition = condition_class(condition_name)()
    out.update(condition.fidelity_scores(images, data, judge))
    return out


def rows_base_and_condition(rows, base, condition):
    """``(adapter folders, base, condition)`` of an evaluation: the base defaults to the one recorded by
    the first adapter row, and the condition is rebuilt from that adapter's saved config.

    Raises:
        ValueError: an adapter row was trained for another condition than ``condition`` (it would be
            sampled with a condition it never saw, and scored against the wrong fidelity metric).
    """
    adapters = [r.model for r in rows if r.model not in ("teacher", "bicubic")
                and plain_adapter_kind(r.model) is None]  # a diffusers adapter folder records neither
    if base is None:
        if not adapters:
            raise ValueError("pass base= (--base) when no row names a condistill adapter folder")
        base = read_adapter_config(adapters[0])["base_name_or_path"]
    name = condition["name"] if isinstance(condition, dict) else condition
    for path in dict.fromkeys(adapters):
        trained = read_adapter_config(path)["condition_name"]
        if trained != name:
            raise ValueError(f"condition={name!r}: the adapter {path} was trained for {trained!r}; evaluate it with "
                             f"condition={trained!r} (its export records the condition and its options)")
    if isinstance(condition, dict):
        cond = condition_from_config(condition)
    elif adapters:
        cond = condition_from_config(read_adapter_config(adapters[0])["condition_config"])
    else:
        cond = get_condition(condition)
    return adapters, base, cond


def eval_resolution(adapters: list[str], base) -> int:
    """The image size every row samples at: the resolution the adapters were trained at (they must agree),
    else the base's native one (``base``: a loaded :class:`~condistill.frozen.Base`, or its name or folder, whose
    configs are read without loading weights)."""
    from condistill.frozen import native_resolution

    sizes = {path: int(read_adapter_config(path)["resolution"]) for path in dict.fromkeys(adapters)}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{path} at {size} px" for path, size in sizes.items())
        raise ValueError(f"the adapters were trained at different resolutions ({listed}); evaluate adapters of "
                         "one resolution together")
    if sizes:
        return next(iter(sizes.values()))
    return base.resolution if hasattr(base, "resolution") else native_resolution(base)


class SceneItems:
    """The held-out synthetic scenes of an evaluation and their judge-based metrics (:func:`score`).

    The judge and the scenes load before the base, so a missing judge stops the evaluation at once."""

    prompts = None  # the scenes' prompt accuracy comes from the judge; no CLIP score

    def __init__(self, cond, resolution: int, num_images: int, seed: int, judge_path: str):
        from condistill.world.judge import load_judge

        self.cond, self.judge = cond, load_judge(judge_path)
        source = open_source(f"synthetic:heldout:{num_images}", resolution=resolution)
        dataset = ConditionDataset(source, cond, resolution, seed=seed + 12345)
        self.items = collate([dataset[i] for i in range(len(dataset))])
        self.real_features = self.judge.features((self.items["pixel_values"] + 1) / 2)
        self.skipped: dict[str, str] = {}

    def score(self, images: torch.Tensor) -> dict:
        return score(self.cond.name, images, self.items, self.judge, self.real_features, self.cond)

    def finish(self, report: dict, batch_size: int) -> dict:
        return report

    def write(self, out_dir: Path, report: dict) -> None:
        """Nothing beyond the common files."""


def evaluate(
    condition: str | dict,
    rows: list[RowSpec],
    *,
    base: str | None = None,
    num_images: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    judge_path: str = "embedded:judge",
    out_dir: str | Path | None = None,
    grid_count: int = 8,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    data: str | None = None,
    prompts: str | list[str] | None = None,
    data_options: dict | None = None,
    lcm_lora: str | None = None,
    lcm_lora_scale: float = 1.0,
) -> dict:
    """Score every row on ``num_images`` held-out synthetic scenes (or, with ``data``, on items of that data
    source, opened with ``data_options``: :mod:`condistill.evaluation.user_data`, ``prompts`` replacing their
    captions); optionally write results.

    ``condition`` is a condition name or a recorded condition config; an adapter row trained for another
    condition is refused, and the condition is rebuilt from the first adapter row's export. ``base``
    defaults to the base recorded by the first adapter row. Everything but the base (the adapters'
    configs, the judge or the data items, the prompts) is read before the base loads. Writes
    ``results.json``, ``results.md`` and ``samples.png`` to ``out_dir``. Each unavailable optional
    metric (LPIPS, FID on Inception features, CLIP score with ``data``) is reported once through ``log``
    (default: :func:`warnings.warn`) and recorded in ``report["skipped_metrics"]``. ``lcm_lora`` (a LoRA file,
    folder or hub id) is loaded into the base for the rows with ``lcm_lora`` set, at ``lcm_lora_scale``
    (:mod:`condistill.evaluation.lcm_lora`).
    """
    if any(r.lcm_lora for r in rows) and lcm_lora is None:
        raise ValueError("rows sample with an LCM-LoRA but none was given (--lcm-lora)")
    from condistill.evaluation.third_party import OptionalMetrics

    adapters, base, cond = rows_base_and_condition(rows, base, condition)
    resolution = eval_resolution(adapters, base)
    if data is None:
        items = SceneItems(cond, resolution, num_images, seed, judge_path)
    else:
        from condistill.evaluation.user_data import DataItems
        items = DataItems(cond, resolution, str(data), num_images, seed, prompts, log, data_options)
    base_obj = load_base(base, device=device)
    if lcm_lora is not None:
        from condistill.evaluation.lcm_lora import load_lcm_lora
        load_lcm_lora(base_obj, lcm_lora)
    real_images = (items.items["pixel_values"] + 1) / 2
    optional = OptionalMetrics(cond.name, device=device, log=log)

    results, samples, students = [], [], {}
    for spec in rows:
        images, latency = generate_row(spec, base_obj, items.items, batch_size, seed, students, cache_dir, cond,
                                       lcm_lora_scale if lcm_lora is not None else None)
        metrics = items.score(images)
        metrics.update(optional.score(images, real_images, prompts=items.prompts))
        metrics["seconds_per_image"] = latency
        results.append(RowResult.of(spec, metrics))
        samples.append(images[:grid_count])
    report = items.finish({
        "condition": cond.name, "base": str(base), "num_images": num_images, "seed": seed, "resolution": resolution,
        "device": device, "rows": [asdict(r) for r in results], "skipped_metrics": {**optional.skipped, **items.skipped},
        "models": {path: training_facts(path) for path in dict.fromkeys(
            r.model for r in rows if r.model not in ("teacher", "bicubic"))}}, batch_size)
    if out_dir is not None:
        write_report(report, Path(out_dir), items.items, samples, [r.name for r in results], grid_count)
        items.write(Path(out_dir), report)
    return report


def training_facts(path: str) -> dict:
    """What an evaluated adapter is: its kind, loss and training length, from its config."""
    plain = plain_adapter_kind(path)
    if plain is not None:
        return {"kind": f"{plain[0]} (a diffusers folder, not a condistill export)", "loss": None,
                "steps_trained": None, "sampler": None}
    config = read_adapter_config(path)
    extra = config.get("extra") or {}
    return {"kind": config["kind"], "loss": extra.get("loss"), "steps_trained": extra.get("steps_trained"),
            "sampler": adapter_sampler(path)}


def markdown_table(report: dict) -> str:
    """The rows of ``report`` as a markdown table (fidelity metric first)."""
    fid_key, better = fidelity_metric(report["condition"]) or (None, None)
    start_from = condition_class(report["condition"]).start_description()
    keys = ([fid_key] if fid_key else []) + [k for k in ("ssim", "lpips", "frechet_distance", "fid_inception", "prompt_accuracy",
                                    "clip_score", "seconds_per_image")
                        if any(k in r["metrics"] for r in report["rows"])]
    arrows = {fid_key: " (higher better)" if better == "higher" else " (lower better)",
              "lpips": " (lower)", "frechet_distance": " (lower)", "fid_inception": " (lower)",
              "prompt_accuracy": " (higher)", "clip_score": " (higher)"}
    lines = ["| row | sampler | steps | CFG | " + " | ".join(k + arrows.get(k, "") for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in report["rows"]:
        vals = []
        for k in keys:
            v = r["metrics"].get(k)
            vals.append("" if v is None else (f"{v:.4f}" if k == "seconds_per_image" else f"{v:.3f}"))
        sampler = r["sampler"] if r.get("start") is None else f"{r['sampler']} from {start_from} at t={r['start']}"
        lines.append(f"| {r['name']} | {sampler} | {r['steps']} | {r['guidance']:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def skipped_note(report: dict) -> str:
    """One line naming the optional metrics the report skipped and why ("" when none was)."""
    skipped = report.get("skipped_metrics") or {}
    if not skipped:
        return ""
    return "Skipped metrics: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "\n"


def write_report(report: dict, out_dir: Path, data: dict, samples: list, names: list[str], count: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    note = skipped_note(report)
    (out_dir / "results.md").write_text(markdown_table(report) + ("\n" + note if note else ""))
    rows = [[to_pil(c) for c in data["conditioning"][:count]],
            [to_pil((p + 1) / 2) for p in data["pixel_values"][:count]]]
    rows += [[to_pil(x) for x in s] for s in samples]
    grid(rows, ["condition", "real", *[n[:11] for n in names]]).save(out_dir / "samples.png")


def ratio_summary(report: dict, student: str, reference: str) -> dict:
    """Fidelity difference and speed-up of row ``student`` against row ``reference``."""
    rows = {r["name"]: r["metrics"] for r in report["rows"]}
    fid_key, better = fidelity_metric(report["condition"]) or (None, None)
    s, r = rows[student], rows[reference]
    if fid_key is None:  # a condition without a fidelity metric: speed and Frechet distance only
        return {"fidelity_metric": None, "speedup": r["seconds_per_image"] / max(s["seconds_per_image"], 1e-12),
                "fd_ratio": s["frechet_distance"] / max(r["frechet_distance"], 1e-12)}
    return {"fidelity_metric": fid_key, "student": s[fid_key], "reference": r[fid_key],
            "student_better_or_equal": bool(s[fid_key] >= r[fid_key] if better == "higher" else s[fid_key] <= r[fid_key]),
            "speedup": r["seconds_per_image"] / max(s["seconds_per_image"], 1e-12),
            "fd_ratio": s["frechet_distance"] / max(r["frechet_distance"], 1e-12)}


def parse_rows(texts: list[str]) -> list[RowSpec]:
    """``name=model:sampler:steps:guidance:start`` (sampler/steps/guidance/start optional) -> specs.

    ``start`` is a grid timestep to start from the condition's own image (sr, inpaint; the zero
    latent for edge and depth; CoDi samplers), e.g. ``student-1-from-input=runs/sr:codi-stochastic:1:1:499``.
    """
    specs = []
    for text in texts:
        if "=" not in text:
            raise ValueError(f"row {text!r}: write NAME=MODEL[:SAMPLER[:STEPS[:GUIDANCE[:START]]]], e.g. "
                             "'student-4=runs/edge:codi:4' or 'teacher-50=teacher:ddim:50:5'")
        name, rest = text.split("=", 1)
        parts = rest.split(":")
        model = parts[0]
        if model not in ("teacher", "bicubic") and not Path(model).exists():
            raise FileNotFoundError(f"row {name!r}: adapter folder {model!r} not found")
        if model == "bicubic":
            specs.append(RowSpec(name, model, "none", 0, 0.0))
            continue
        sampler = parts[1] if len(parts) > 1 else "codi"
        if sampler not in SAMPLERS:
            raise ValueError(f"row {name!r}: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if len(parts) > 5:
            raise ValueError(f"row {name!r}: {rest!r} has {len(parts)} fields; write MODEL[:SAMPLER[:STEPS[:GUIDANCE[:START]]]]")
        steps, guidance, start = (_row_number(name, parts, i, kind, what) for i, kind, what in
                                  ((2, int, "STEPS"), (3, float, "GUIDANCE"), (4, int, "START")))
        if start is not None and sampler not in CODI_SAMPLERS:
            raise ValueError(f"row {name!r}: starting from the input (START {start}) needs the codi or "
                             f"codi-stochastic sampler, not {sampler!r}")
        if steps is not None and steps < 1:
            raise ValueError(f"row {name!r}: STEPS {steps} must be at least 1")
        specs.append(RowSpec(name, model, sampler, 4 if steps is None else steps,
                             1.0 if guidance is None else guidance, start))
    return specs


def _row_number(name: str, parts: list[str], index: int, kind: type, what: str):
    """Field ``index`` of a row spec as ``kind`` (``None`` when absent or empty); a malformed one names the row."""
    if len(parts) <= index or not parts[index]:
        return None
    try:
        return kind(parts[index])
    except ValueError:
        raise ValueError(f"row {name!r}: {what} {parts[index]!r} is not {'an integer' if kind is int else 'a number'}; "
                         "write NAME=MODEL[:SAMPLER[:STEPS[:GUIDANCE[:START]]]]") from None


def default_rows(student: str, baseline: str | None = None, condition: str | None = None,
                 guidance: float = 5.0) -> list[RowSpec]:
    """Students at 1/2/4 steps (with the sampler and guidance saved in the adapter; one step from the start it was
    trained for, its ``one_step_start``), the teacher at 50 DDIM steps with CFG, and (if given) the
    conventionally trained baseline at 50 DDIM + CFG, 4 DDIM and 4 LCM steps."""
    config = read_adapter_config(student)
    sampler, guidance_1, start = adapter_sampler(student), config["recommended_guidance"], config["one_step_start"]
    one = start["timestep"] if start and start["from"] != "noise" else None
    rows = [RowSpec(f"student-{k}", student, sampler, k, guidance_1, one if k == 1 else None) for k in (1, 2, 4)]
    if baseline:
        rows += [RowSpec("baseline-ddim-50", baseline, "ddim", 50, guidance),
                 RowSpec("baseline-ddim-4", baseline, "ddim", 4, guidance),
                 RowSpec("baseline-lcm-4", baseline, "lcm", 4, guidance)]
    rows.append(RowSpec("teacher-ddim-50", "teacher", "ddim", 50, guidance))
    if condition == "sr":
        rows.append(RowSpec("bicubic", "bicubic", "none", 0, 0.0))
    return rows


def evaluate_data(condition: str | dict, rows: list, data: str, *, prompts: str | list[str] | None = None,
                  **options) -> dict:
    """Score every row on ``num_images`` items of the data source ``data``; optionally write results.

    :func:`evaluate` with ``data``: the same rows, ``condition``/``base`` rules, keyword ``options`` and
    output files (plus ``conditions.safetensors``: the conditions every row sampled), but no judge: see
    :mod:`condistill.evaluation.user_data` for the items and metrics.
    """
    return evaluate(condition, rows, data=str(data), prompts=prompts, **options)
