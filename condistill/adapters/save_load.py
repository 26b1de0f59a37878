"""Adapter files: stock diffusers weights + ``condistill_config.json`` + the few-step scheduler.

Layout of an exported adapter folder (``save_adapter``)::

    condistill_config.json            what was distilled, on which base, how to sample it
    scheduler/scheduler_config.json   CoDiScheduler config (teacher schedule + training grid)
    controlnet/                       kind "controlnet": ControlNetModel.save_pretrained folder
    t2i_adapter/                      kinds "t2i_adapter" and "lora": T2IAdapter.save_pretrained folder
    pytorch_lora_weights.safetensors  kind "lora": diffusers-format LoRA of the UNet

Every weight file is safetensors; nothing is pickled. The export is written whole under a staging
folder beside ``out_dir`` and swapped in (:func:`condistill.files.staged_folder`): a reader sees the
previous export or the new one, never a mix. ``condistill_config.json``, written last, records the
SHA-256 of every file loading reads (``checksums``), and every loader checks the config
(:mod:`condistill.adapters.config_checks`) and the checksums before it builds anything.
``condistill.load_adapter`` turns such a folder into a stock diffusers pipeline;
:func:`load_student` rebuilds the training-time student from it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from condistill.adapters.config_checks import (
    CARD_NAME,
    CONFIG_NAME,
    SAMPLES_NAME,
    SCHEDULER_SUBFOLDER,
    SCHEMA_VERSION,
    check_base_resolution,
    check_config,
    config_problems,
    normalize_one_step_start,
    record_checksums,
    verify_checksums,
)
from condistill.files import previous_folder, set_shared_mode, staged_folder
from condistill.frozen import NOISE_SCHEDULE_KEYS
from condistill.method import one_step
from condistill.utils import jsonable

__all__ = [
    "CONFIG_NAME",
    "SCHEDULER_SUBFOLDER",
    "SCHEMA_VERSION",
    "EXPORT_SUBFOLDER",
    "save_adapter",
    "export_names",
    "read_adapter_config",
    "find_adapter_dir",
    "load_student_weights",
    "load_student",
    "condistill_version",
]

#: Where a training run writes its export inside the run folder (runs written before kept it at the root).
EXPORT_SUBFOLDER = "adapter"

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
    one_step_start: dict | int | None = None,
) -> Path:
    """Export a trained student's adapter to ``out_dir`` (see the module docstring for the layout).

    Args:
        student: a :class:`condistill.adapters.Student`; its *current* weights are written (swap
            the EMA weights in first to export the EMA).
        out_dir: folder to write: new, empty, or an earlier export, which is replaced whole (written under
            ``.tmp-<name>-<pid>`` beside it and swapped in; a kill leaves the earlier export intact).
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
        one_step_start: where the student was trained to take a single step from
            (:mod:`condistill.method.one_step`): ``{"timestep": s, "from": "noise" | "zero" | "input"}``
            (a bare timestep means the condition's image, or the zero latent for a condition that is
            not an image), or None (not trained for one step in particular). Recorded in the config
            and the scheduler config, whose one-step schedule starts there.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: a value the export could not be loaded with (:func:`condistill.adapters.config_checks.config_problems`),
            or an ``out_dir`` that holds anything but an earlier export (a run folder's ``checkpoints/``,
            unrelated files): replacing it would delete them. Nothing is written then.
    """
    from condistill.method.schedule import normalize_prediction_type

    kind = getattr(student, "kind", "")
    if not kind or not hasattr(student, "save_weights"):
        raise TypeError(f"save_adapter needs a condistill Student (build_student), got {type(student).__name__}.")
    prediction_type = normalize_prediction_type(prediction_type)
    schedule = dict(noise_schedule) if noise_schedule is not None else _noise_schedule_from_base(base_name_or_path)
    recorded_start = jsonable(one_step_start, "one_step_start")
    one_step_start = one_step.normalize(recorded_start, _is_image(condition_name))
    scheduler_config = jsonable({**(schedule or {}), "prediction_type": prediction_type, "num_grid": num_grid,
                                 "sigma_data": 0.5, "timestep_scaling": 10.0, "stochastic": bool(stochastic),
                                 "one_step_start": one_step_start}, "noise_schedule")
    config = {
        "schema_version": SCHEMA_VERSION,
        "condistill_version": condistill_version(),
        "kind": kind,
        "base_name_or_path": os.fspath(base_name_or_path),
        "base_fingerprint": jsonable(dict(base_fingerprint), "base_fingerprint"),
        # absolute path of a local base folder: found again when loading from another directory
        "base_resolved_path": str(Path(base_name_or_path).resolve()) if Path(base_name_or_path).is_dir() else None,
        "condition_name": condition_name,
        "condition_config": jsonable(dict(condition_config), "condition_config"),
        "num_grid": num_grid,
        "prediction_type": prediction_type,
        "recommended_steps": recommended_steps,
        "recommended_guidance": recommended_guidance,
        "resolution": resolution,
        "height": resolution if height is None else height,
        "width": resolution if width is None else width,
        "one_step_start": recorded_start,  # as given for the checks' messages; written in its dict form
        "adapter_options": jsonable(student.adapter_options, "adapter_options"),
        "scheduler": f"{SCHEDULER_SUBFOLDER}/scheduler_config.json",
        "initialized_from": student.initialized_from,
        "extra": jsonable(dict(extra or {}), "extra"),
    }
    problems = config_problems({**config, "checksums": {}}, scheduler_config)
    if problems:
        raise ValueError(f"save_adapter: {'; '.join(problems)}. Pass the values the run trained with (the "
                         "prediction type: base.prediction_type); nothing was written.")
    config["recommended_guidance"] = float(recommended_guidance)
    config["one_step_start"] = one_step_start
    out = Path(out_dir)
    _check_replaceable(out)
    # an earlier export is replaced whole through a staging folder; an empty or new folder (e.g. a caller's own
    # staging folder) is written in place: its config, written last, makes it an export only once complete
    fresh = not out.exists() or not any(out.iterdir())
    if fresh:
        out.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(out) if fresh else staged_folder(out, log=_say) as stage:
        config["weight_files"] = dict(student.save_weights(stage))
        _write_scheduler_config(stage, scheduler_config)
        config["checksums"] = record_checksums(stage, config["weight_files"])
        (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # last
        if fresh:
            set_shared_mode(out)  # what staged_folder's swap does for a replaced export
    return out


def _is_image(condition_name: str) -> bool:
    from condistill.conditions import available_conditions, condition_class

    return condition_name in available_conditions() and condition_class(condition_name).has_start_image()


def _say(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def export_names(out: Path) -> set[str]:
    """The top-level names an earlier export in ``out`` may hold: what any kind writes, the model card, and the
    files its own config names."""
    from condistill.adapters.config_checks import loaded_files
    from condistill.adapters.registry import available_adapters, get_adapter_class

    rels = [rel for kind in available_adapters() for rel in get_adapter_class(kind).weight_components.values()]
    try:
        old = json.loads((out / CONFIG_NAME).read_text())
        rels += loaded_files(out, old["weight_files"]) + list(old.get("checksums") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {CONFIG_NAME, SCHEDULER_SUBFOLDER, CARD_NAME, SAMPLES_NAME} | {str(rel).split("/")[0] for rel in rels}


def _check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is missing, empty, or an earlier export (nothing else in it)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_adapter: {out} is a file, not a folder; choose another out_dir (nothing was written).")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    what = f"holds {entries[:8]}{' ...' if len(entries) > 8 else ''}"
    if not (out / CONFIG_NAME).is_file():
        raise ValueError(
            f"save_adapter: {out} {what} but no earlier export ({CONFIG_NAME}); an export replaces its folder "
            f"whole, so it goes to a new or empty folder or over an earlier export. Choose another out_dir (a run "
            f"writes its export to <run>/{EXPORT_SUBFOLDER}); nothing was written.")
    foreign = [name for name in entries if name not in export_names(out)]
    if foreign:
        raise ValueError(
            f"save_adapter: {out} holds an earlier export but also {foreign}, which replacing it would delete (a run "
            f"folder's checkpoints/, unrelated files). Write the export to a folder of its own, such as "
            f"<run>/{EXPORT_SUBFOLDER}; nothing was written.")


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """The folder holding ``condistill_config.json`` for ``path``: a run folder's ``adapter/`` subfolder (where
    runs write their export), else ``path`` itself (an adapter folder, or a run written before ``adapter/``).

    ``path`` may also be the config file itself. When neither holds a config but a write was interrupted
    between the two renames that swap a new export in (:func:`condistill.files.previous_folder` finds the
    previous export, ``.old-adapter`` or ``.old-<name>``), that previous export is used, with a one-line warning.

    Raises:
        FileNotFoundError: none exists; the message says what a valid folder contains.
    """
    path = Path(path)
    if path.is_file() and path.name == CONFIG_NAME:
        return path.parent
    for candidate in (path / EXPORT_SUBFOLDER, path):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    for candidate in (path / EXPORT_SUBFOLDER, path):
        old = previous_folder(candidate)
        if old is not None and (old / CONFIG_NAME).is_file():
            warnings.warn(f"{candidate} is missing while a new export replaces it (or that write was interrupted); "
                          f"reading the previous export {old}.", stacklevel=2)
            return old
    raise FileNotFoundError(
        f"No {CONFIG_NAME} in {path / EXPORT_SUBFOLDER} or {path}. Pass a folder written by "
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
    upgrade. Every value is then checked, and the scheduler config against it
    (:func:`condistill.adapters.config_checks.check_config`: an
    :class:`~condistill.adapters.errors.AdapterConfigError` names the key, the value and what to do).
    The returned dict also holds ``"_folder"``: the folder it was read from. The weight files
    themselves and their checksums are checked when loaded (:mod:`condistill.adapters.integrity`,
    :func:`~condistill.adapters.config_checks.verify_checksums`).
    """
    from condistill.adapters.errors import AdapterWeightsError
    from condistill.adapters.integrity import adapter_class_for

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
    schema = config.get("schema_version", 1)
    if isinstance(schema, int) and schema > SCHEMA_VERSION:
        warnings.warn(f"{file} has schema version {config['schema_version']}, newer than this condistill's "
                      f"{SCHEMA_VERSION}; keys it does not know are ignored (upgrade condistill to use them).",
                      stacklevel=2)
    adapter_class_for(config, folder)
    config.setdefault("schema_version", 1)
    config.setdefault("height", config["resolution"])
    config.setdefault("width", config["resolution"])
    config.setdefault("one_step_start", None)
    check_config(config, folder)
    normalize_one_step_start(config)
    config["_folder"] = str(folder)
    return config


def load_student_weights(student, path: str | os.PathLike) -> None:
    """Load exported adapter weights from ``path`` (adapter or run folder) into ``student``.

    The files named in ``condistill_config.json`` are used when it is present, else the default
    names of the student's kind. Nothing is loaded before the config passed its checks
    (:func:`read_adapter_config`), every file its checksum and the checks of
    :mod:`condistill.adapters.integrity` (safetensors only, exact keys and shapes, finite
    values); a failure raises :class:`condistill.adapters.AdapterWeightsError` naming the file
    and tensors.
    """
    from condistill.adapters.integrity import resolve_weight_files

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
        resolve_weight_files(folder, type(student), weight_files)  # missing or pickled files named first
        verify_checksums(config, folder)
    student.load_weights(folder, weight_files)


def load_student(path: str | os.PathLike, base, check_base: bool = True):
    """Rebuild the student saved in ``path`` around ``base`` (a :class:`condistill.frozen.Base`) and load its weights.

    The config is checked (:func:`read_adapter_config`), and the weight files (they exist, are
    safetensors, match their checksums) before anything is built, the training resolution against
    ``base``, and the files' tensors against the rebuilt student before anything is loaded.

    Raises:
        AdapterWeightsError: damaged, incomplete, pickled or non-finite files, or a config whose
            kind does not match its files (a ``ValueError``; the message says what to do).
        AdapterConfigError: a config value that cannot be trusted, or a resolution ``base`` cannot use.
        ValueError: the base's fingerprint differs from the one recorded with the adapter.
    """
    from condistill.adapters.integrity import adapter_class_for, resolve_weight_files, student_from_config
    from condistill.frozen import fingerprint_mismatch

    config = read_adapter_config(path)
    folder = config["_folder"]
    resolve_weight_files(folder, adapter_class_for(config, folder), config["weight_files"])
    verify_checksums(config, folder)
    if check_base:
        problems = fingerprint_mismatch(config["base_fingerprint"], base.fingerprint())
        if problems:
            raise ValueError(
                f"The adapter in {config['_folder']} was distilled from base {config['base_name_or_path']!r} "
                f"but the given base {base.name_or_path!r} differs: {'; '.join(problems)}. Use the base it was "
                "trained on."
            )
        check_base_resolution(config, base.name_or_path)
    student = student_from_config(config, base, folder)
    student.load_weights(folder, config["weight_files"])
    return student
