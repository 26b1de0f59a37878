"""Integrity checks of an exported adapter's files, shared by both ways of loading one.

The training side (:func:`condistill.adapters.save_load.load_student`,
:func:`~condistill.adapters.save_load.load_student_weights`, every kind's
:meth:`~condistill.adapters.Student.load_weights`) and the pipeline side
(:func:`condistill.load_adapter`) run the same checks before they build anything from the files:

1. the config's ``kind`` is a registered adapter kind and its ``weight_files`` name exactly the
   components that kind declares (:attr:`Student.weight_components`), see :func:`adapter_class_for`;
2. every named file exists, lies inside the adapter folder and is safetensors; pickles
   (``.bin``...) are never loaded, also when one lies where the safetensors file is missing,
   see :func:`resolve_weight_files`;
3. each file holds exactly the tensors, with the shapes, of a student built from the saved
   ``adapter_options`` (the pipeline side builds it on the ``meta`` device: no memory, no
   initialisation), and every floating tensor is finite, see :func:`check_weight_tensors`.

Every failure is an :class:`~condistill.adapters.AdapterWeightsError` (a ``ValueError``)
naming the folder, the file and the offending tensors, and saying what to do.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

import torch

from condistill.adapters.errors import (
    REEXPORT,
    AdapterWeightsError,
    check_state_dict_keys,
    check_state_dict_shapes,
    name_list,
)
from condistill.adapters.registry import available_adapters, build_student, get_adapter_class

__all__ = [
    "REEXPORT",
    "adapter_class_for",
    "check_components",
    "path_inside",
    "shard_files",
    "resolve_weight_files",
    "check_weight_tensors",
    "read_checked_weights",
    "student_from_config",
    "check_adapter_fits",
    "load_stock_module",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")


def adapter_class_for(config: Mapping[str, Any], source) -> type:
    """The :class:`Student` class of an adapter config, after checking its kind and weight_files.

    Raises:
        AdapterWeightsError: unknown ``kind``, or ``weight_files`` that are not the kind's
            components (e.g. kind ``"controlnet"`` with only a ``"t2i_adapter"`` file).
    """
    kind = config.get("kind")
    known = available_adapters()
    if not isinstance(kind, str) or kind not in known:
        raise AdapterWeightsError(
            f"The adapter in {source} has an unknown adapter kind {kind!r} (known kinds: {known}). "
            f"Its condistill_config.json is damaged or was written by a newer condistill (then upgrade). {REEXPORT}"
        )
    cls = get_adapter_class(kind)
    check_components(cls, config.get("weight_files"), source)
    return cls


def check_components(cls: type, weight_files, source) -> None:
    """``weight_files`` must map exactly ``cls.weight_components`` to relative file paths."""
    if not isinstance(weight_files, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_files.items()
    ):
        raise AdapterWeightsError(
            f"The adapter in {source}: weight_files must map component names to relative file paths, "
            f"got {weight_files!r}. {REEXPORT}"
        )
    listed, needed = sorted(weight_files), sorted(cls.weight_components)
    if listed == needed:
        return
    owners = [k for k in available_adapters() if sorted(get_adapter_class(k).weight_components) == listed]
    whose = f" (the files of a {' or '.join(repr(k) for k in owners)} adapter)" if owners else ""
    raise AdapterWeightsError(
        f"The adapter in {source} says kind {cls.kind!r} but its weight_files list {listed}{whose}: a "
        f"{cls.kind!r} adapter has {needed}. Its config and its files do not belong together. {REEXPORT}"
    )


def path_inside(rel: str, folder: Path, component: str) -> Path:
    """``folder / rel`` for a relative posix path ``rel`` that stays inside ``folder`` (``component``: what
    it is, for the message)."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel:
        raise AdapterWeightsError(
            f"The adapter in {folder}: the file {rel!r} of {component!r} is not a path inside the adapter "
            f"folder. {REEXPORT}"
        )
    return folder / pure


def _check_safetensors_file(path: Path, folder: Path, component: str) -> None:
    """``path`` is an existing safetensors file (or shard index with existing safetensors shards)."""
    if not path.name.endswith(_SAFETENSORS_SUFFIXES):
        raise AdapterWeightsError(
            f"The adapter in {folder}: weight file {path.name!r} of {component!r} is not safetensors; condistill "
            f"loads only .safetensors weights, never pickles (they can run code when loaded). {REEXPORT}"
        )
    if not path.is_file():
        pickles = (
            sorted(p.name for p in path.parent.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
            if path.parent.is_dir()
            else []
        )
        found = (
            f"; only pickle weights {pickles} are there, which condistill never loads (they can run code "
            "when loaded)"
            if pickles
            else ""
        )
        raise AdapterWeightsError(
            f"The adapter in {folder}: weight file {path} of {component!r} is missing{found}. The adapter was "
            f"not saved or downloaded completely. {REEXPORT}"
        )
    if path.name.endswith(".index.json"):
        for shard in shard_files(path, folder, component):
            _check_safetensors_file(shard, folder, component)


def shard_files(index: Path, folder: Path, component: str) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names (beside it)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AdapterWeightsError(f"The shard index {index} is damaged (no valid weight_map). {REEXPORT}") from None
    return [path_inside(name, index.parent, component) for name in names]


def resolve_weight_files(
    folder: str | os.PathLike, cls: type, weight_files: Mapping[str, str] | None = None
) -> dict[str, Path]:
    """``{component: path}`` of an adapter's weight files, each checked to exist and be safetensors.

    ``weight_files`` is the config's ``{component: relative file}``; None (a folder without
    ``condistill_config.json``) takes the kind's default names, or their shard indexes.
    """
    folder = Path(folder)
    if weight_files is None:
        weight_files = {}
        for component, default in cls.weight_components.items():
            index = f"{default}.index.json"
            sharded = not (folder / default).exists() and (folder / index).is_file()
            weight_files[component] = index if sharded else default
    check_components(cls, weight_files, folder)
    paths = {}
    for component, rel in weight_files.items():
        path = path_inside(rel, folder, component)
        _check_safetensors_file(path, folder, component)
        paths[component] = path
    return paths


def _tensors(path: Path, folder: Path, component: str, keys_only: bool = False) -> Iterator[tuple[str, Any]]:
    """``(key, tensor)`` of a safetensors file or sharded checkpoint; ``keys_only``: ``(key, shape)``."""
    from safetensors import safe_open

    files = shard_files(path, folder, component) if path.name.endswith(".index.json") else [path]
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    yield key, (handle.get_slice(key).get_shape() if keys_only else handle.get_tensor(key))
        except AdapterWeightsError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise AdapterWeightsError(
                f"{file} is not a valid safetensors file ({type(error).__name__}: {error}); it is damaged or was "
                f"cut short. {REEXPORT}"
            ) from None


def check_weight_tensors(
    expected: Mapping[str, Mapping[str, torch.Tensor]], files: Mapping[str, Path], folder, keep: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Check each file against ``expected[component]`` (keys, shapes) and for non-finite values.

    Keys and shapes come from the file headers first (nothing read); then the tensors are read
    one at a time for the finite check. ``keep`` returns them (``{component: state}``), else
    they are dropped as soon as checked (the pipeline side, whose diffusers loaders read again).
    """
    folder = Path(folder)
    states: dict[str, dict[str, torch.Tensor]] = {}
    for component, path in files.items():
        shapes = {k: torch.empty(tuple(shape), device="meta") for k, shape in _tensors(path, folder, component, True)}
        check_state_dict_keys(expected[component], shapes, str(path))
        check_state_dict_shapes(expected[component], shapes, str(path))
        bad, state = [], {}
        for key, tensor in _tensors(path, folder, component):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(key)
            if keep:
                state[key] = tensor
        if bad:
            raise AdapterWeightsError(
                f"The weights in {path} hold non-finite values (NaN or Inf) in {len(bad)} tensor(s): "
                f"{name_list(sorted(bad))}. The adapter is damaged or its training diverged. {REEXPORT}"
            )
        states[component] = state
    return states


def read_checked_weights(
    student, folder: str | os.PathLike, weight_files: Mapping[str, str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """The training side: ``{component: state}`` of an adapter's files, checked against ``student``."""
    files = resolve_weight_files(folder, type(student), weight_files)
    states = check_weight_tensors(student.file_state_dicts(), files, folder, keep=True)
    student.check_weight_files(files)
    return states


def student_from_config(config: Mapping[str, Any], unet, source):
    """A student of the config's kind built from its ``adapter_options`` around ``unet`` (or a Base)."""
    cls = adapter_class_for(config, source)
    options = config.get("adapter_options")
    if not isinstance(options, Mapping) or not isinstance(options.get("condition_channels"), int):
        raise AdapterWeightsError(
            f"The adapter in {source}: adapter_options must be a JSON object with an int condition_channels, "
            f"got {options!r}. {REEXPORT}"
        )
    options = dict(options)
    channels = options.pop("condition_channels")
    try:
        return build_student(cls.kind, unet, channels, **options)
    except (TypeError, ValueError) as error:
        raise AdapterWeightsError(
            f"The adapter in {source} says kind {cls.kind!r} but its adapter_options {sorted(options)} cannot "
            f"build a {cls.kind!r} student on this base ({error}). {REEXPORT}"
        ) from None


def check_adapter_fits(adapter_dir: Path, config: Mapping[str, Any], files: Mapping[str, Path], unet) -> None:
    """The pipeline side: the files fit a student built from the config around ``unet``'s architecture.

    The student is built on the ``meta`` device from ``unet.config`` (no weights are allocated
    or copied, and ``unet`` itself is not touched).
    """
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet: its module
    with torch.device("meta"):
        student = student_from_config(config, type(unet).from_config(unet.config), adapter_dir)
    check_weight_tensors(student.file_state_dicts(), files, adapter_dir)
    student.check_weight_files(files)


def load_stock_module(model_cls, adapter_dir: Path, rel: str, dtype):
    """``model_cls.from_pretrained`` (safetensors only) of a diffusers model folder inside the adapter.

    The module diffusers builds from that folder's ``config.json`` must hold exactly the file's
    tensors (a config that does not match its weights would leave some uninitialised).
    """
    adapter_dir = Path(adapter_dir)
    path = path_inside(rel, adapter_dir, model_cls.__name__)
    if not (path.parent / "config.json").is_file():
        raise AdapterWeightsError(f"The adapter in {adapter_dir}: {path.parent} has no config.json. {REEXPORT}")
    sub = PurePosixPath(rel).parent.as_posix()
    module = model_cls.from_pretrained(
        adapter_dir, subfolder=None if sub == "." else sub, torch_dtype=dtype, use_safetensors=True
    )
    saved = [key for key, _ in _tensors(path, adapter_dir, model_cls.__name__, keys_only=True)]
    check_state_dict_keys(module.state_dict(), saved, str(path))
    return module
