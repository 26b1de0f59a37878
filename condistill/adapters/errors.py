"""The error of unusable adapter files and the key/shape checks that raise it.

A leaf module: :mod:`condistill.adapters.student` (a student's own state dicts),
:mod:`condistill.adapters.integrity` (exported weight files) and
:mod:`condistill.adapters.config_checks` (exported configs) all raise these, and import nothing
of each other to do it.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

__all__ = ["AdapterWeightsError", "AdapterConfigError", "REEXPORT", "check_state_dict_keys", "check_state_dict_shapes",
           "name_list"]

#: What the user can do about damaged or mismatched adapter files (ends every message).
REEXPORT = (
    "Re-export the adapter with condistill.adapters.save_load.save_adapter (or re-download it); "
    "do not edit its files by hand."
)
_MAX_NAMES = 5


class AdapterWeightsError(ValueError):
    """Adapter files that cannot be used: damaged, incomplete, pickled, non-finite, or not fitting.

    Raised for missing / unexpected tensors, wrong shapes, NaN/Inf weights, missing or
    non-safetensors weight files, files whose SHA-256 differs from the one recorded at export, and
    configs whose ``kind`` does not match their files; the message names the file and tensors and
    says what to do (re-export or re-download).
    """


class AdapterConfigError(AdapterWeightsError):
    """An adapter's ``condistill_config.json`` or ``scheduler/scheduler_config.json`` that cannot be trusted: a
    value of the wrong type or out of range, two files that contradict each other, or a config that does
    not fit the base. The message names the file, the key, the bad value and what to do."""


def name_list(names: list[str], max_names: int = _MAX_NAMES) -> str:
    """``names`` shown up to ``max_names``, then how many more."""
    more = f" (and {len(names) - max_names} more)" if len(names) > max_names else ""
    return f"{names[:max_names]}{more}"


_FIT_HINT = (
    "If you built the student yourself, build it with the same adapter kind, options and base as the "
    "saved adapter (condistill.adapters.save_load.load_student does this from condistill_config.json); "
    "otherwise the adapter's files are damaged or incomplete: re-export it with save_adapter or re-download it."
)


def check_state_dict_keys(expected: Iterable[str], found: Iterable[str], source: str, max_names: int = 5) -> None:
    """Raise :class:`AdapterWeightsError` when ``found`` keys differ from ``expected`` keys.

    The message names up to ``max_names`` missing and unexpected keys and says what to do.
    """
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {name_list(missing, max_names)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {name_list(unexpected, max_names)}")
    raise AdapterWeightsError(
        f"The weights in {source} do not fit this student: " + "; ".join(parts) + ". " + _FIT_HINT
    )


def check_state_dict_shapes(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`AdapterWeightsError` naming the first tensors whose shapes differ."""
    bad = [
        f"{k}: saved {tuple(found[k].shape)} vs student {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise AdapterWeightsError(
            f"The weights in {source} have the wrong shape for this student ({len(bad)} tensors, e.g. "
            f"{bad[:3]}). " + _FIT_HINT
        )
