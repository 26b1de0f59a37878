"""Adapter files: stock diffusers weights + ``condistill_config.json`` + the few-step scheduler.

Layout of an exported adapter folder (``save_adapter``)::

    condistill_config.json            what was distilled, on which base, how to sample it
    scheduler/scheduler_config.json   CoDiScheduler config (teacher schedule + training grid)
    controlnet/                       kind "controlnet": ControlNetModel.save_pretrained folder
    t2i_adapter/                      kinds "t2i_adapter" and "lora": T2IAdapter.save_pretrained folder
    pytorch_lora_weights.safetensors  kind "lora": diffusers-format LoRA of the UNet

Every weight file is safetensors; nothing is pickled. ``condistill.load_adapter`` turns such a
folder into a stock diffusers pipeline; :func:`load_student` rebuilds the training-time
student from it.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from condistill.frozen import NOISE_SCHEDULE_KEYS
from condistill.utils import jsonable

__all__ = [
    "CONFIG_NAME",
    "SCHEDULER_SUBFOLDER",
    "save_adapter",
    "read_adapter_config",
    "find_adapter_dir",
    "load_student_weights",
    "load_student",
    "condistill_version",
]

CONFIG_NAME = "condistill_config.json"
SCHEDULER_SUBFOLDER = "scheduler"

REQUIRED_KEYS = (
    "condistill_version",
    "kind",
    "base_name_or_path",
    "base_fingerprint",
    "condition_name",
    "condition_config",
    "num_grid",
    "prediction_type",
    "recommended_steps",
    "recommended_guidance",
    "resolution",
    "weight_files",
    "adapter_options",
)
OPTIONAL_KEYS = ("initialized_from", "scheduler", "base_resolved_path", "extra", "schema_version", "height", "width",
                 "one_step_start", "checksums")

#: The version of the ``condistill_config.json`` layout written by :func:`save_adapter`. 1: the
#: exports written before the key existed (no ``height``/``width``); 2: adds ``schema_version``,
#: ``height``/``width`` (the sampling size) and ``one_step_start``. ``docs/export-format.md``
#: describes every key. :func:`read_adapter_config` derives the keys an older export lacks.
SCHEMA_VERSION = 2


def condistill_version() -> str:
    """The installed condistill version (``importlib.metadata``), else the source tree's ``__version__``."""
    try:
        from importlib.metadata import version

        return version("condistill")
    except Exception:  # noqa: BLE001 - not installed: running from a source tree
        try:
            import condistill

            return str(getattr(condistill, "__version__", "0.0.0"))
        except Exception:  # noqa: BLE001
            return "0.0.0"


def _major(version: str) -> int:
    head = str(version).strip().lstrip("vV").split(".")[0]
    digits = "".join(ch for ch in head if ch.isdigit())
    return int(digits) if digits else 0


def _noise_schedule_from_base(base_name_or_path: str) -> dict[str, Any] | None:
    """The base's noise-schedule keys when its scheduler config can be found locally, else None."""
    from condistill.frozen import NOISE_SCHEDULE_DEFAULTS
    from condistill.hub import resolve_pretrained_dir

    try:
        root = resolve_pretrained_dir(base_name_or_path, what="base model")
    except (FileNotFoundError, OSError, ValueError):
        return None
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return {k: cfg.get(k, NOISE_SCHEDULE_DEFAULTS[k]) for k in NOISE_SCHEDULE_KEYS}


def _write_scheduler_config(out_dir: Path, config: dict[str, Any]) -> None:
    folder = out_dir / SCHEDULER_SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from condistill.method.codi_scheduler import CoDiScheduler
    except ImportError:  # scheduler module unavailable: write the config dict diffusers-style
        data = {"_class_name": "CoDiScheduler", **config}
        (folder / "scheduler_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return
    CoDiScheduler.from_config(config).save_config(folder)


def save_adapter(
    student,
    out_dir: str | os.PathLike,
    *,
    base_name_or_path: str,
    base_fingerprint: Mapping[str, Any],
    condition_name: str,
    condition_config: Mapping[str, Any],
    num_grid: int,
    prediction_type: str,
    recommended_steps: int = 4,
    recommended_guidance: float = 1.0,
    resolution: int,
    extra: Mapping[str, Any] | None = None,
    noise_schedule: Mapping[str, Any] | None = None,
    stochastic: bool = True,
    height: int | None = None,
    width: int | None = None,
    one_step_start: int | None = None,
) -> Path:
    """Export a trained student's adapter to ``out_dir`` (see the module docstring for the layout).

    Args:
        student: a :class:`condistill.adapters.Student`; its *current* weights are written (swap
            the EMA weights in first to export the EMA).
        out_dir: folder to write (created; existing adapter files are overwritten).
        base_name_or_path: the base as the user named it (folder or hub id); ``load_adapter``
            loads it from there unless given ``base=``.
        base_fingerprint: ``base.fingerprint()``, checked against the base at load time.
        condition_name, condition_config: the condition kind and its JSON-able options.
        num_grid: N of the training skip grid (the sampler must use the same grid).
        prediction_type: the teacher's prediction type.
        recommended_steps, recommended_guidance: sampling defaults stored with the adapter.
        resolution: training resolution in pixels (training images are square).
        height, width: the image size the adapter samples at by default (``load_adapter``'s
            ``pipe.condistill_defaults``); default ``resolution``. Multiples of the base's VAE factor.
        extra: any further JSON-able facts (loss, steps trained...).
        noise_schedule: the teacher's noise schedule (``base.noise_schedule_config()``); when
            None it is read from the base folder if found, else filled in at load time from the
            base pipeline's scheduler.
        stochastic: the saved sampler re-noises with fresh noise between steps (consistency-model
            multistep sampling, the default); False makes it reuse the model's noise estimate.
        one_step_start: the grid timestep a one-step student was trained to start from
            (``dmd_start_timestep``), or None (the top of the grid, from pure noise).

    Returns:
        ``Path(out_dir)``.
    """
    from condistill.method.schedule import normalize_prediction_type

    kind = getattr(student, "kind", "")
    if not kind or not hasattr(student, "save_weights"):
        raise TypeError(f"save_adapter needs a condistill Student (build_student), got {type(student).__name__}.")
    if not isinstance(num_grid, int) or num_grid < 2:
        raise ValueError(f"num_grid must be an int >= 2, got {num_grid!r}.")
    if not isinstance(recommended_steps, int) or not 1 <= recommended_steps <= num_grid:
        raise ValueError(f"recommended_steps must be an int in 1..num_grid={num_grid}, got {recommended_steps!r}.")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int (pixels), got {resolution!r}.")
    height, width = resolution if height is None else height, resolution if width is None else width
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}.")
    if one_step_start is not None and (not isinstance(one_step_start, int) or one_step_start < 0):
        raise ValueError(f"one_step_start must be a grid timestep (an int) or None, got {one_step_start!r}.")
    prediction_type = normalize_prediction_type(prediction_type)
    fingerprint = jsonable(dict(base_fingerprint), "base_fingerprint")
    if fingerprint.get("prediction_type", prediction_type) != prediction_type:
        raise ValueError(
            f"prediction_type {prediction_type!r} differs from the base fingerprint's "
            f"{fingerprint['prediction_type']!r}; pass base.prediction_type."
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_files = student.save_weights(out)

    schedule = dict(noise_schedule) if noise_schedule is not None else _noise_schedule_from_base(base_name_or_path)
    scheduler_config: dict[str, Any] = dict(schedule or {})
    scheduler_config.update(
        prediction_type=prediction_type,
        num_grid=num_grid,
        sigma_data=0.5,
        timestep_scaling=10.0,
        stochastic=bool(stochastic),
    )
    scheduler_config = jsonable(scheduler_config, "noise_schedule")
    _write_scheduler_config(out, scheduler_config)

    config = {
        "schema_version": SCHEMA_VERSION,
        "condistill_version": condistill_version(),
        "kind": kind,
        "base_name_or_path": os.fspath(base_name_or_path),
        "base_fingerprint": fingerprint,
        # absolute path of a local base folder: found again when loading from another directory
        "base_resolved_path": str(Path(base_name_or_path).resolve()) if Path(base_name_or_path).is_dir() else None,
        "condition_name": condition_name,
        "condition_config": jsonable(dict(condition_config), "condition_config"),
        "num_grid": num_grid,
        "prediction_type": prediction_type,
        "recommended_steps": recommended_steps,
        "recommended_guidance": float(recommended_guidance),
        "resolution": resolution,
        "height": height,
        "width": width,
        "one_step_start": one_step_start,
        "weight_files": dict(weight_files),
        "adapter_options": jsonable(student.adapter_options, "adapter_options"),
        "scheduler": f"{SCHEDULER_SUBFOLDER}/scheduler_config.json",
        "initialized_from": student.initialized_from,
        "extra": jsonable(dict(extra or {}), "extra"),
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """The folder holding ``condistill_config.json``: ``path`` itself or its ``adapter/`` subfolder.

    ``path`` may also be the config file itself.

    Raises:
        FileNotFoundError: neither exists; the message says what a valid folder contains.
    """
    path = Path(path)
    if path.is_file() and path.name == CONFIG_NAME:
        return path.parent
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"No {CONFIG_NAME} in {path} or {path / 'adapter'}. Pass a folder written by "
        "condistill.adapters.save_load.save_adapter (or a distillation run folder)."
    )


def adapter_sampler(path: str | os.PathLike) -> str:
    """The few-step sampler an adapter folder asks for: ``"codi-stochastic"`` when its saved
    scheduler re-noises between steps, else ``"codi"`` (names of :func:`condistill.method.sampler.make_scheduler`)."""
    file = find_adapter_dir(path) / SCHEDULER_SUBFOLDER / "scheduler_config.json"
    stochastic = file.is_file() and bool(json.loads(file.read_text()).get("stochastic", False))
    return "codi-stochastic" if stochastic else "codi"


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``condistill_config.json`` of an adapter folder (or run folder, or the file).

    Keys an export written by an earlier schema lacks are derived as they were then (``height``
    and ``width``: the training ``resolution``; ``schema_version``: 1; ``one_step_start``: None).
    Unknown keys are warned about and kept; missing keys, invalid JSON, an unknown ``kind`` or
    ``weight_files`` that are not that kind's components raise
    :class:`~condistill.adapters.AdapterWeightsError` (a ``ValueError``) naming them; an adapter
    written by a newer *major* condistill version raises a :class:`ValueError` asking to
    upgrade. The returned dict also holds ``"_folder"``: the folder it was read from. The
    weight files themselves are checked when loaded (:mod:`condistill.adapters.integrity`).
    """
    from condistill.adapters.integrity import adapter_class_for
    from condistill.adapters.student import AdapterWeightsError

    folder = find_adapter_dir(path)
    file = folder / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise AdapterWeightsError(f"{file} is not valid JSON ({error}); re-export the adapter.") from None
    if not isinstance(config, dict):
        raise AdapterWeightsError(f"{file} must hold a JSON object; re-export the adapter.")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise AdapterWeightsError(
            f"{file} is missing required key(s) {missing}; it was not written by "
            "condistill.adapters.save_load.save_adapter or is damaged. Re-export the adapter."
        )
    unknown = sorted(set(config) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        warnings.warn(f"{file}: ignoring unknown key(s) {unknown} (written by another condistill version?).", stacklevel=2)
    saved, ours = str(config["condistill_version"]), condistill_version()
    if _major(saved) > _major(ours):
        raise ValueError(
            f"{file} was written by condistill {saved}, a newer major version than the installed {ours}; "
            "upgrade condistill (pip install -U condistill) to load it."
        )
    if int(config.get("schema_version", 1)) > SCHEMA_VERSION:
        warnings.warn(f"{file} has schema version {config['schema_version']}, newer than this condistill's "
                      f"{SCHEMA_VERSION}; keys it does not know are ignored (upgrade condistill to use them).",
                      stacklevel=2)
    adapter_class_for(config, folder)
    config.setdefault("schema_version", 1)
    config.setdefault("height", config["resolution"])
    config.setdefault("width", config["resolution"])
    config.setdefault("one_step_start", None)
    config["_folder"] = str(folder)
    return config


def load_student_weights(student, path: str | os.PathLike) -> None:
    """Load exported adapter weights from ``path`` (adapter or run folder) into ``student``.

    The files named in ``condistill_config.json`` are used when it is present, else the default
    names of the student's kind. Nothing is loaded before every file passed the checks of
    :mod:`condistill.adapters.integrity` (safetensors only, exact keys and shapes, finite
    values); a failure raises :class:`condistill.adapters.AdapterWeightsError` naming the file
    and tensors.
    """
    path = Path(path)
    weight_files = None
    try:
        folder = find_adapter_dir(path)
    except FileNotFoundError:
        if not path.is_dir():
            raise FileNotFoundError(f"Adapter folder {path} not found; pass the folder written by save_adapter.") from None
        folder = path
    else:
        config = read_adapter_config(folder)
        if config["kind"] != student.kind:
            raise ValueError(
                f"{folder} holds a {config['kind']!r} adapter but the student is {student.kind!r}; "
                f"build it with build_student({config['kind']!r}, ...) or use load_student."
            )
        weight_files = config["weight_files"]
    student.load_weights(folder, weight_files)


def load_student(path: str | os.PathLike, base, check_base: bool = True):
    """Rebuild the student saved in ``path`` around ``base`` (a :class:`condistill.frozen.Base`) and load its weights.

    The weight files are checked (they exist, are safetensors) before anything is built, and
    their tensors against the rebuilt student before anything is loaded.

    Raises:
        AdapterWeightsError: damaged, incomplete, pickled or non-finite files, or a config whose
            kind does not match its files (a ``ValueError``; the message says what to do).
        ValueError: the base's fingerprint differs from the one recorded with the adapter.
    """
    from condistill.adapters.integrity import adapter_class_for, resolve_weight_files, student_from_config
    from condistill.frozen import fingerprint_mismatch

    config = read_adapter_config(path)
    folder = config["_folder"]
    resolve_weight_files(folder, adapter_class_for(config, folder), config["weight_files"])
    if check_base:
        problems = fingerprint_mismatch(config["base_fingerprint"], base.fingerprint())
        if problems:
            raise ValueError(
                f"The adapter in {config['_folder']} was distilled from base {config['base_name_or_path']!r} "
                f"but the given base {base.name_or_path!r} differs: {'; '.join(problems)}. Use the base it was "
                "trained on."
            )
    student = student_from_config(config, base, folder)
    student.load_weights(folder, config["weight_files"])
    return student
