"""Command lines of the world-building scripts, made from their config dataclasses.

Each script describes a run with one dataclass; :func:`parser_from_dataclass` gives every field
a ``--flag-name`` and :func:`config_from_args` builds the config from the flags actually given
(the dataclass's defaults, or a factory's such as a smoke preset, fill in the rest)::

    parser = parser_from_dataclass(TrainJudgeConfig, "Train the judge.", helps={"steps": "optimizer steps"})
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    cfg = config_from_args(TrainJudgeConfig, args, parser, TrainJudgeConfig.smoke if args.smoke else None)

Field types map to flags as: ``int``/``float``/``str`` take a value; a ``bool`` that defaults to
False is a switch (``--require-judge``), one that defaults to True takes a value
(``--augment false``); a tuple of ints takes ``A,B,C``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, fields

__all__ = ["config_from_args", "parse_bool", "parse_int_tuple", "parser_from_dataclass"]


def parse_int_tuple(text: str) -> tuple[int, ...]:
    """``"8,16,32"`` -> ``(8, 16, 32)``."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` (any case) -> True, anything else -> False."""
    return text.lower() in ("1", "true", "yes", "on")


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default; give it one or skip it")


def parser_from_dataclass(cls, description: str, helps: Mapping[str, str] | None = None,
                          skip: Iterable[str] = ()) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one flag per field of the dataclass ``cls`` (``foo_bar`` -> ``--foo-bar``).

    Flags that are not given are absent from the parsed namespace, so :func:`config_from_args`
    passes on only what the command line names. ``helps`` maps field names to help texts (the
    default is appended); ``skip`` names fields that get no flag (e.g. a nested config the
    script fills from flags of its own).
    """
    helps, skip = dict(helps or {}), set(skip)
    unknown = (set(helps) | skip) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    parser = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "")
        if isinstance(default, bool) and not default:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text or None)
            continue
        if isinstance(default, bool):
            kwargs = dict(type=parse_bool, metavar="BOOL")
            shown = str(default)
        elif isinstance(default, tuple) and all(isinstance(v, int) for v in default):
            kwargs = dict(type=parse_int_tuple, metavar=",".join("ABCDEFGH"[:len(default)]) or "A,B")
            shown = ",".join(map(str, default))
        elif isinstance(default, (int, float, str)):
            kwargs = dict(type=type(default))
            shown = str(default)
        else:
            raise TypeError(f"field {f.name!r} of {cls.__name__} ({type(default).__name__}) has no flag type; "
                            "skip it and add a flag of your own")
        parser.add_argument(flag, default=argparse.SUPPRESS, help=f"{text} (default {shown})".strip(), **kwargs)
    return parser


def config_from_args(cls, args: argparse.Namespace, parser: argparse.ArgumentParser,
                     factory: Callable | None = None):
    """``factory(**flags given)`` (default ``cls``); a ``ValueError``/``TypeError`` of the config
    becomes a usage error of ``parser`` (exit status 2 with the message)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    try:
        return (factory or cls)(**overrides)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
