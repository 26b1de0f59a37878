"""What an exported adapter's configs must hold, and the checksums of the files loading reads.

Both ways of loading an export (the training side: :func:`~condistill.adapters.save_load.read_adapter_config`,
:func:`~condistill.adapters.save_load.load_student`, :func:`~condistill.adapters.save_load.load_student_weights`;
the pipeline side: :func:`condistill.load_adapter`) trust nothing the export says:

- :func:`check_config` refuses values of the wrong type or out of range in ``condistill_config.json``
  (:func:`config_problems` lists them; :func:`~condistill.adapters.save_load.save_adapter` runs the
  same list before it writes anything), a ``scheduler/scheduler_config.json`` that contradicts it, and
  a prediction type that contradicts the recorded base fingerprint;
- :func:`check_base_resolution` refuses a training resolution the base it is loaded on cannot use;
- :func:`verify_checksums` compares the SHA-256 of every file loading reads with the one
  :func:`record_checksums` recorded at export (an export written before schema 3 has none: it loads
  with a one-line warning).

Every refusal is an :class:`~condistill.adapters.errors.AdapterConfigError` or
:class:`~condistill.adapters.AdapterWeightsError` (both ``ValueError``) naming the file, the key, the
bad value and what to do.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from condistill.adapters.errors import AdapterConfigError, AdapterWeightsError
from condistill.adapters.integrity import path_inside, shard_files
from condistill.method import one_step

__all__ = ["CONFIG_NAME", "SCHEDULER_SUBFOLDER", "SCHEDULER_FILE", "SCHEMA_VERSION", "PIXEL_MULTIPLE",
           "config_problems", "check_config", "check_base_resolution", "loaded_files", "record_checksums",
           "verify_checksums"]

CONFIG_NAME = "condistill_config.json"
SCHEDULER_SUBFOLDER = "scheduler"
#: the model card and its sample grid, written into an export by :mod:`condistill.publish.card`
CARD_NAME = "README.md"
SAMPLES_NAME = "samples.png"
SCHEDULER_FILE = f"{SCHEDULER_SUBFOLDER}/scheduler_config.json"
#: The version of the ``condistill_config.json`` layout written by ``save_adapter``. 1: the exports
#: written before the key existed (no ``height``/``width``); 2: adds ``schema_version``,
#: ``height``/``width`` (the sampling size) and ``one_step_start``; 3: adds ``checksums`` (written
#: whole and swapped in); 4: ``one_step_start`` becomes ``{"timestep", "from"}`` (a bare timestep
#: before) and is also in the scheduler config. ``docs/export-format.md`` describes every key.
SCHEMA_VERSION = 4
_CHECKSUMS_SINCE = 3
#: Sides in pixels are multiples of this whatever the base (its own multiple is checked against the base).
PIXEL_MULTIPLE = 8
_EDITED = ("The file was edited or damaged: re-export the adapter with condistill.adapters.save_load.save_adapter "
           "(or re-download it); do not edit its files by hand.")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_start_image(config: Mapping[str, Any]) -> bool | None:
    """Whether the config's condition is an image (sr, inpaint); None for an unknown condition."""
    from condistill.conditions import available_conditions, condition_class

    name = config.get("condition_name")
    return condition_class(name).has_start_image() if name in available_conditions() else None


def normalize_one_step_start(config: dict) -> None:
    """Give ``config["one_step_start"]`` its dict form (a bare timestep was written before schema 4)."""
    config["one_step_start"] = one_step.normalize(config.get("one_step_start"), bool(_has_start_image(config)))


def _prediction_type(value) -> str | None:
    from condistill.method.schedule import normalize_prediction_type

    try:
        return normalize_prediction_type(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _value_problems(config: Mapping[str, Any], grid) -> list[str]:
    """Types and ranges of the sampling and size keys; ``grid`` is the training grid (None when unknown)."""
    from condistill.method.schedule import PREDICTION_TYPES

    problems = []

    def bad(key: str, why: str) -> None:
        if key in config:
            problems.append(f"{key} = {config[key]!r}: {why}")

    for key in ("resolution", "height", "width"):
        value = config.get(key)
        if not (_int(value) and value > 0 and value % PIXEL_MULTIPLE == 0):
            bad(key, f"must be a positive int multiple of {PIXEL_MULTIPLE} (pixels)")
    num_grid, steps = config.get("num_grid"), config.get("recommended_steps")
    if not (_int(steps) and 1 <= steps <= (num_grid if _int(num_grid) else steps)):
        bad("recommended_steps", f"must be an int in 1..num_grid ({num_grid!r})")
    guidance = config.get("recommended_guidance")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        bad("recommended_guidance", "must be a finite number >= 0 (the classifier-free guidance scale; 0 and 1 "
                                    "mean no guidance)")
    for why in one_step.problems(config.get("one_step_start"), grid, _has_start_image(config)):
        bad("one_step_start", why)
    if _prediction_type(config.get("prediction_type")) is None:
        bad("prediction_type", f"must be one of {list(PREDICTION_TYPES)}")
    return problems


def _grid(config: Mapping[str, Any], scheduler: Mapping[str, Any] | None) -> tuple[list[int] | None, list[str]]:
    """The training grid the config's ``num_grid`` makes on the scheduler's timesteps, and its problems."""
    from condistill.method.schedule import skip_grid

    if "num_grid" not in config:
        return None, []
    num_grid = config["num_grid"]
    if not (_int(num_grid) and num_grid >= 2):
        return None, [f"num_grid = {num_grid!r}: must be an int >= 2 (the points of the training grid)"]
    timesteps = (scheduler or {}).get("num_train_timesteps", 1000)
    try:
        return skip_grid(timesteps, num_grid).tolist(), []
    except (TypeError, ValueError) as error:
        return None, [f"num_grid = {num_grid!r}: {error}"]


def _condition_problems(config: Mapping[str, Any]) -> list[str]:
    from condistill.conditions import available_conditions, condition_from_config

    if "condition_name" not in config:
        return []
    name, options = config["condition_name"], config.get("condition_config", {})
    if name not in available_conditions():
        return [f"condition_name = {name!r}: must be a known condition ({', '.join(available_conditions())})"]
    if not isinstance(options, Mapping) or options.get("name", name) != name:
        return [f"condition_config = {options!r}: must be a JSON object of the {name!r} condition's options"]
    try:
        condition_from_config({**options, "name": name})
    except (TypeError, ValueError) as error:
        return [f"condition_config = {dict(options)!r}: does not build a {name!r} condition ({error})"]
    return []


def _type_problems(config: Mapping[str, Any]) -> list[str]:
    kinds = {"condistill_version": (str,), "base_name_or_path": (str,), "base_fingerprint": (dict,),
             "adapter_options": (dict,), "extra": (dict, type(None)), "initialized_from": (str, type(None)),
             "base_resolved_path": (str, type(None)), "scheduler": (str, type(None)),
             "checksums": (dict, type(None))}
    problems = [f"{key} = {config[key]!r}: must be {' or '.join('null' if t is type(None) else t.__name__ for t in types)}"
                for key, types in kinds.items() if key in config and not isinstance(config[key], types)]
    schema = config.get("schema_version", 1)
    if not (_int(schema) and schema >= 1):
        problems.append(f"schema_version = {schema!r}: must be an int >= 1")
    checksums = config.get("checksums")
    if isinstance(checksums, dict):
        wrong = {k: v for k, v in checksums.items() if not (isinstance(v, str) and _SHA256.fullmatch(v))}
        if wrong:
            problems.append(f"checksums = {wrong!r}: every value must be a hex SHA-256 (64 characters 0-9a-f)")
    elif checksums is None and _int(schema) and schema >= _CHECKSUMS_SINCE:
        problems.append(f"checksums = null: an export of schema_version {schema} records the SHA-256 of its files")
    fingerprint, own = config.get("base_fingerprint"), _prediction_type(config.get("prediction_type"))
    if isinstance(fingerprint, dict) and own and "prediction_type" in fingerprint:
        theirs = _prediction_type(fingerprint["prediction_type"])
        if theirs != own:
            problems.append(f"prediction_type = {config['prediction_type']!r}: differs from the base fingerprint's "
                            f"{fingerprint['prediction_type']!r}")
    return problems


def _scheduler_problems(config: Mapping[str, Any], scheduler: Mapping[str, Any]) -> list[str]:
    from condistill.method.codi_scheduler import CoDiScheduler

    if not isinstance(scheduler, Mapping):
        return [f"{SCHEDULER_FILE} = {scheduler!r}: must be a JSON object"]
    problems = []
    for key, same in (("num_grid", lambda a, b: _int(a) and a == b),
                      ("prediction_type", lambda a, b: _prediction_type(a) is not None
                       and _prediction_type(a) == _prediction_type(b))):
        if key in config and not same(scheduler.get(key), config[key]):
            problems.append(f"{key} = {scheduler.get(key)!r} in {SCHEDULER_FILE}: differs from {key} = "
                            f"{config[key]!r} in {CONFIG_NAME} (training and sampling share it)")
    recorded = one_step.normalize(config.get("one_step_start"), bool(_has_start_image(config)))
    if "one_step_start" in scheduler and scheduler["one_step_start"] != recorded:
        problems.append(f"one_step_start = {scheduler['one_step_start']!r} in {SCHEDULER_FILE}: differs from "
                        f"one_step_start = {config.get('one_step_start')!r} in {CONFIG_NAME}")
    if not problems:
        try:
            CoDiScheduler.from_config({k: v for k, v in scheduler.items() if not k.startswith("_")})
        except (TypeError, ValueError) as error:
            problems.append(f"{SCHEDULER_FILE}: does not build a CoDiScheduler ({error})")
    return problems


def config_problems(config: Mapping[str, Any], scheduler: Mapping[str, Any] | None = None) -> list[str]:
    """What makes an adapter config untrustworthy, as ``"key = value: why"`` lines (empty: none).

    ``config`` is ``condistill_config.json`` (keys it lacks are not checked here: the reader refuses
    missing required keys), ``scheduler`` the ``scheduler/scheduler_config.json`` beside it, if any.
    Checked: ``resolution``/``height``/``width`` positive ints and multiples of 8; ``num_grid`` an int
    >= 2 that divides the schedule's timesteps; ``recommended_steps`` in ``1..num_grid``;
    ``recommended_guidance`` finite and >= 0; ``one_step_start`` null or a start that fits the grid and the
    condition (:func:`condistill.method.one_step.problems`), the same in the scheduler config;
    ``prediction_type`` known and equal to the base fingerprint's and the scheduler's; ``num_grid``
    equal to the scheduler's; ``condition_name`` a registered condition whose ``condition_config``
    builds; the types of the other keys; ``checksums`` SHA-256 hex digests, present from schema 3 on.
    """
    grid, problems = _grid(config, scheduler)
    problems += _value_problems(config, grid) + _type_problems(config) + _condition_problems(config)
    if scheduler is not None:
        problems += _scheduler_problems(config, scheduler)
    return problems


def check_config(config: Mapping[str, Any], folder: str | os.PathLike) -> None:
    """Refuse an adapter config read from ``folder`` (with its scheduler config) that :func:`config_problems` faults.

    Raises:
        AdapterConfigError: naming the file, every bad key and value, and what to do.
    """
    folder = Path(folder)
    file, scheduler_file = folder / CONFIG_NAME, folder / SCHEDULER_FILE
    scheduler = None
    if scheduler_file.is_file():
        try:
            scheduler = json.loads(scheduler_file.read_text())
        except ValueError as error:
            raise AdapterConfigError(f"{scheduler_file} is not valid JSON ({error}). {_EDITED}") from None
    _check_condition_installed(config, folder)
    problems = config_problems(config, scheduler)
    if problems:
        raise AdapterConfigError(f"The adapter config {file} cannot be trusted: {'; '.join(problems)}. {_EDITED}")


def _check_condition_installed(config: Mapping[str, Any], folder: Path) -> None:
    """A condition name that is neither built in nor declared by an installed package is not damage: say what to
    install (the name is looked up among entry points only; nothing named in the config is imported)."""
    from condistill.conditions import available_conditions
    from condistill.conditions.discovery import ENTRY_POINT_GROUP

    name = config.get("condition_name")
    if isinstance(name, str) and name and name not in available_conditions():
        raise AdapterConfigError(
            f"{folder / CONFIG_NAME}: condition_name = {name!r}: must be a known condition "
            f"({', '.join(available_conditions())}). {folder} was trained with the condition {name!r}, which is not "
            f"installed here: install the package that provides it (it declares the condition in the "
            f"{ENTRY_POINT_GROUP!r} entry-point group). If no package provides it: {_EDITED}")


def check_base_resolution(config: Mapping[str, Any], base: str | os.PathLike) -> None:
    """Refuse a training ``resolution`` that ``base`` (a folder, hub id or ``embedded:`` name) cannot use
    (:func:`condistill.config.check_resolution`); a base whose configs cannot be found here is not checked."""
    from condistill.config import SettingError, check_resolution

    try:
        check_resolution(base, config["resolution"])
    except SettingError as error:
        raise AdapterConfigError(
            f"The adapter config {Path(config['_folder']) / CONFIG_NAME}: resolution = {config['resolution']!r} "
            f"cannot be used with the base {os.fspath(base)!r} ({error}). The config was edited, or the adapter "
            "belongs to another base: load it with the base it was trained on, or re-export it."
        ) from None
    except (FileNotFoundError, OSError, ValueError):
        return


def loaded_files(folder: str | os.PathLike, weight_files: Mapping[str, str]) -> list[str]:
    """The files (relative posix paths) in ``folder`` that loading reads: each weight file and the shards of
    a shard index, the ``config.json`` of each component folder, and the scheduler config; only those that exist."""
    folder = Path(folder)
    files = {SCHEDULER_FILE}
    for component, rel in weight_files.items():
        files.add(rel)
        parent = PurePosixPath(rel).parent
        if parent != PurePosixPath("."):
            files.add((parent / "config.json").as_posix())
        index = path_inside(rel, folder, component)
        if rel.endswith(".index.json") and index.is_file():
            files |= {shard.relative_to(folder).as_posix() for shard in shard_files(index, folder, component)}
    return sorted(rel for rel in files if (folder / rel).is_file())


def record_checksums(folder: str | os.PathLike, weight_files: Mapping[str, str]) -> dict[str, str]:
    """``{file: SHA-256 hex}`` of the :func:`loaded_files` of ``folder`` (what ``save_adapter`` records)."""
    from condistill.files import sha256_file

    return {rel: sha256_file(Path(folder) / rel) for rel in loaded_files(folder, weight_files)}


def verify_checksums(config: Mapping[str, Any], folder: str | os.PathLike, stacklevel: int = 2) -> None:
    """Compare the files of the export in ``folder`` with the SHA-256 its ``config`` recorded.

    Every file listed must exist and match, and every file loading reads (:func:`loaded_files`) must be
    listed. An export without checksums (written before schema 3) is warned about in one line and not
    refused; ``stacklevel`` counts as ``warnings.warn``'s from the function that calls this one (2: its caller).

    Raises:
        AdapterWeightsError: a file changed since export, or is missing (naming it).
        AdapterConfigError: a file that loading reads has no recorded checksum.
    """
    from condistill.files import sha256_file

    folder = Path(folder)
    file, recorded = folder / CONFIG_NAME, config.get("checksums")
    if recorded is None:
        warnings.warn(f"{folder} has no checksums (exported before condistill's schema {_CHECKSUMS_SINCE}), so a "
                      "damaged or edited file cannot be detected; re-export the adapter to record them.",
                      stacklevel=stacklevel + 1)
        return
    for rel, digest in sorted(recorded.items()):
        path = path_inside(rel, folder, "checksums")
        if not path.is_file():
            raise AdapterWeightsError(f"{path} is missing, though the checksums of {file} list it: the adapter was "
                                      "not saved or downloaded completely; re-export or re-download it.")
        actual = sha256_file(path)
        if actual != digest:
            raise AdapterWeightsError(
                f"{path} changed since export: damaged or edited; re-export or re-download the adapter (its SHA-256 "
                f"is {actual}, the checksums of {file} recorded {digest}).")
    unlisted = [rel for rel in loaded_files(folder, config["weight_files"]) if rel not in recorded]
    if unlisted:
        raise AdapterConfigError(f"The adapter config {file}: checksums = {dict(recorded)!r} records no SHA-256 of "
                                 f"{unlisted}, which loading reads. {_EDITED}")
