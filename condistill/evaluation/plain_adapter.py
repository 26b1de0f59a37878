"""A conventional adapter that is no condistill export: a diffusers ``ControlNetModel`` or ``T2IAdapter`` folder
(or hub id), as ``condistill eval --baseline`` takes it to compare a student with the adapter a user already has.

It is built as a student of that kind started from the folder (``pretrained_controlnet`` /
``pretrained_adapter``, which check that it fits the base and the condition) and sampled like a baseline;
its training length and loss are unknown, and the evaluation's resolution is the students' (or the base's).
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PLAIN_KINDS", "load_plain_adapter", "plain_adapter_kind"]

#: diffusers class -> (student kind, the option that starts it from a folder)
PLAIN_KINDS = {"ControlNetModel": ("controlnet", "pretrained_controlnet"),
               "T2IAdapter": ("t2i_adapter", "pretrained_adapter")}


def plain_adapter_kind(source: str) -> tuple[str, str] | None:
    """``(kind, option)`` when ``source`` is a diffusers ControlNet / T2I-Adapter folder or hub id without a
    condistill export; ``None`` otherwise (a condistill export or run, or anything else)."""
    from condistill.adapters.config_checks import CONFIG_NAME

    path = Path(str(source)).expanduser()
    if path.is_dir() and ((path / CONFIG_NAME).is_file() or (path / "adapter" / CONFIG_NAME).is_file()):
        return None
    if path.is_dir():
        folder = path
    else:
        from condistill.hub import looks_like_repo_id, resolve_pretrained_dir

        if not looks_like_repo_id(str(source)):
            return None
        try:
            folder = resolve_pretrained_dir(str(source), what="adapter")
        except FileNotFoundError:
            return None
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return PLAIN_KINDS.get(name)


def load_plain_adapter(source: str, base, condition):
    """The student of ``source``'s kind started from it, on ``base``, for ``condition``'s channels."""
    from condistill.adapters import build_student

    kind, option = plain_adapter_kind(source)
    return build_student(kind, base, condition.channels, **{option: str(source)})
