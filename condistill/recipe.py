"""Shared command line of the per-condition recipes (``recipes/<condition>.py``).

Each option of :class:`condistill.config.DistillConfig` becomes ``--option-name`` with the
field's help text; a recipe supplies its condition and presets. The resolved configuration
is validated as a whole (every problem reported at once) and saved to the run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from condistill.config import ConfigError, DistillConfig

SKIP = {"condition"}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(condition: str, presets: dict[str, dict], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Run the same command again with --resume latest to continue an interrupted run.",
    )
    parser.add_argument("--preset", choices=sorted(presets), default="cpu-demo",
                        help="a named set of defaults; explicit options override it: "
                             + "; ".join(f"{k}: {v.get('_help', '')}" for k, v in presets.items()))
    hints = typing.get_type_hints(DistillConfig)
    for f in dataclasses.fields(DistillConfig):
        if f.name in SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        if f.name.endswith("_options"):
            parser.add_argument(flag, type=json.loads, default=None, help=help_text + " (a JSON object)")
        elif kind is bool:
            parser.add_argument(flag, type=_parse_bool, default=None, help=help_text)
        elif kind in (int, float):
            parser.add_argument(flag, type=kind, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=str, default=None, help=help_text)
    return parser


def config_from_args(condition: str, presets: dict[str, dict], argv=None, description: str = "") -> DistillConfig:
    parser = build_parser(condition, presets, description)
    args = vars(parser.parse_args(argv))
    preset = {k: v for k, v in presets[args.pop("preset")].items() if not k.startswith("_")}
    values = {"condition": condition, **preset, **{k: v for k, v in args.items() if v is not None}}
    try:
        return DistillConfig(**values)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def recipe_main(condition: str, presets: dict[str, dict], description: str, argv=None) -> None:
    cfg = config_from_args(condition, presets, argv, description)
    from condistill.train import distill

    out = distill(cfg)
    print(f"adapter written to {out} (load it with condistill.load_adapter({str(out)!r}))", file=sys.stderr)
