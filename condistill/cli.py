"""The ``condistill`` command (also ``python -m condistill``).

- ``condistill train CONDITION [options]``: one distillation run; the options are those of
  :class:`condistill.config.DistillConfig`, over the condition's presets
  (:mod:`condistill.presets`). ``recipes/<condition>.py`` runs the same code.
- ``condistill eval [options]``: score students and baselines on held-out synthetic scenes.

Each option of :class:`~condistill.config.DistillConfig` becomes ``--option-name`` with the
field's help text. The resolved configuration is validated as a whole (every problem reported
at once) and saved to the run folder. Every command parses with
:class:`~condistill.cli_parsing.CommandParser`: options spelt in full, errors in one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import typing
from pathlib import Path

from condistill.cli_parsing import (DEBUG_FLAG, DEBUG_HELP, CommandParser, FlagWithOldValue, adapter_option_problem,
                                    check_data_source, check_device, check_output, cli_form, command_parser,
                                    condition_from_options, guarded, json_object, nonnegative, parse_bool,
                                    warmup_warning)
from condistill.config import ConfigError, DistillConfig, check_grid, check_resolution, option_choices
from condistill.presets import DEFAULT_PRESET, RECIPES, condition_names, presets_for, recipe_description

SKIP = {"condition"}


def _shown(value) -> str:
    """How ``--help`` writes a default value."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def effective_defaults(presets: dict[str, dict], preset: str) -> dict[str, typing.Any]:
    """What each option of :class:`DistillConfig` is when not given: the preset's value, else the dataclass default."""
    chosen = presets[preset]
    out = {}
    for f in dataclasses.fields(DistillConfig):
        if f.name in chosen:
            out[f.name] = chosen[f.name]
        else:
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def chosen_preset(presets: dict[str, dict], argv=None) -> str:
    """The ``--preset`` named in ``argv`` (the default one when absent or unknown; the full parser reports the latter)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--preset")
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:  # "--preset" without a value: the full parser says so
        return DEFAULT_PRESET
    return known.preset if known.preset in presets else DEFAULT_PRESET


def build_parser(condition: str, presets: dict[str, dict], description: str, prog: str | None = None,
                 preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """The parser of ``condistill train CONDITION``; ``--help`` shows the defaults of ``preset``.

    Every option parses to ``None`` when not given, so that :func:`config_from_args` can tell an
    explicit option (which wins over the preset) from a defaulted one; the effective default
    (``preset``'s value, else the dataclass default) is written into the help text instead.
    Enumerated options have ``choices`` (:func:`condistill.config.option_choices`); ``--overwrite``
    is a bare flag (``--overwrite true``/``false``, its old form, is still read, with a warning).
    """
    parser = CommandParser(
        prog=prog, description=description,
        epilog="Run the same command again with --resume latest to continue an interrupted run.",
    )
    parser.add_argument("--preset", choices=sorted(presets), default=DEFAULT_PRESET,
                        help="a named set of defaults; explicit options override it (the defaults below are those "
                             f"of {preset}): " + "; ".join(f"{k}: {v.get('_help', '')}" for k, v in presets.items())
                             .replace("%", "%%") + f" (default: {DEFAULT_PRESET})")
    hints = typing.get_type_hints(DistillConfig)
    defaults = effective_defaults(presets, preset)
    choices = option_choices()
    for f in dataclasses.fields(DistillConfig):
        if f.name in SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = cli_form(f.metadata.get("help", ""))  # options named as typed: --output-dir, not output_dir
        help_text += " (a JSON object)" if f.name.endswith("_options") else ""
        help_text = f"{help_text} (default: {_shown(defaults[f.name])})".replace("%", "%%")
        kw: dict[str, typing.Any] = dict(default=None, help=help_text)
        if f.name.endswith("_options"):
            kw.update(type=json_object, metavar="JSON")
        elif f.name == "overwrite":  # a bare flag; "--overwrite true/false" is still read, with a warning
            kw.update(action=FlagWithOldValue)
        elif kind is bool:
            kw.update(type=parse_bool, metavar="{true,false}")
        elif kind in (int, float):
            kw.update(type=kind)
        elif typing.get_origin(kind) is list:
            kw.update(type=str, nargs="+", metavar=f.name.rsplit("_", 1)[-1].upper().rstrip("S"))
        else:
            kw.update(type=str, choices=choices.get(f.name))
        parser.add_argument(flag, **kw)
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return parser


def config_from_args(condition: str, argv=None, prog: str | None = None) -> DistillConfig:
    """The validated :class:`DistillConfig` of ``condistill train CONDITION ARGV``.

    Precedence: the explicit options, then the chosen preset, then the dataclass defaults.
    A command line that does not parse exits with status 2; invalid values exit with status 1 and
    every problem listed on one line.
    """
    presets = presets_for(condition)
    parser = build_parser(condition, presets, recipe_description(condition), prog=prog,
                          preset=chosen_preset(presets, argv))
    args = vars(parser.parse_args(argv))
    args.pop("debug")
    preset = {k: v for k, v in presets[args.pop("preset")].items() if not k.startswith("_")}
    values = {"condition": condition, **preset, **{k: v for k, v in args.items() if v is not None}}
    try:
        return DistillConfig(**values)
    except ConfigError as err:  # the options as the user wrote them: --max-steps 0, not max_steps=0
        parser.exit(1, f"{parser.prog}: error: {problems_line(err.problems)}\n")


def problems_line(problems: list[str]) -> str:
    """Every problem of a configuration on one line, the options as typed."""
    if len(problems) == 1:
        return cli_form(problems[0])
    return f"{len(problems)} problems: " + " ".join(f"({i}) {cli_form(p)};" for i, p in enumerate(problems, 1))[:-1]


def _adapter_option_problem(cfg: DistillConfig) -> str | None:
    """The ``--adapter-options`` problem of ``cfg`` in one line, or ``None`` (tests/test_docs.py checks the
    documented commands with it)."""
    return adapter_option_problem(cfg.adapter, cfg.adapter_options)


def check_run(cfg: DistillConfig) -> None:
    """What ``condistill train`` checks before any model loads (each raises one line): the adapter and condition
    options, the files the condition needs, the resolution and grid against the base's configs, the output
    folder and the data. The run itself then checks what its folder holds
    (:func:`condistill.training.loop.distill`).
    """
    problem = _adapter_option_problem(cfg)
    if problem:
        raise ValueError(problem)
    condition = condition_from_options(cfg.condition, cfg.condition_options)  # and the weights it needs
    resolution = check_resolution(cfg.base, cfg.resolution)
    check_grid(cfg.base, cfg.num_grid, cfg.dmd_start_timestep)
    check_output(cfg.output_dir, "--output-dir", "folder")
    check_data_source(cfg.data, resolution, cfg.data_options, condition.record_conditioning)


def recipe_main(condition: str, argv=None, prog: str | None = None) -> int:
    """Run ``condistill train CONDITION`` with ``argv`` (what ``recipes/<condition>.py`` calls).

    Returns 0 on success. What can be checked before a model loads is checked first (:func:`check_run`).
    A refused input or a stopped run prints its message in one line, the options it names as they are
    typed, and returns 1 (:func:`condistill.cli_parsing.guarded`; ``--debug`` shows the traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"condistill train {condition}"
    return guarded(prog, lambda: _run_training(condition, argv, prog), argv)


def _run_training(condition: str, argv: list[str], prog: str) -> int:
    cfg = config_from_args(condition, argv, prog)
    check_run(cfg)
    main_process = int(os.environ.get("RANK", "0")) == 0  # a launcher's other processes say nothing
    warning = warmup_warning(cfg)
    if warning and main_process:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    from condistill.training.loop import distill

    out = distill(cfg)
    if main_process:  # one line for the run, not one per process
        print(f"adapter written to {out / 'adapter'} (load it with condistill.load_adapter({str(out)!r}))",
              file=sys.stderr)
    return 0


def _train(argv: list[str]) -> int:
    usage = f"usage: condistill train {{{','.join(RECIPES)}}} [options]  (condistill train CONDITION --help lists them)"
    if not argv or argv[0] in ("-h", "--help"):
        lines = [usage, "", "Distil a frozen text-to-image teacher into a few-step conditional model.", ""]
        lines += [f"  {name:8s} {text}" for name, (text, _) in RECIPES.items()]
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    condition, rest = argv[0], argv[1:]
    if ":" in condition:  # package.module:Class, the user's own condition class
        from condistill.conditions.discovery import import_condition
        try:
            condition = import_condition(condition)
        except (TypeError, ValueError) as error:
            print(f"condistill train: error: {error}", file=sys.stderr)
            return 2
    if condition.startswith("-"):
        later = [word for word in rest if word in RECIPES]
        hint = (f"condistill train {later[0]} {' '.join(w for w in argv if w != later[0])}" if later
                else f"condistill train {{{','.join(RECIPES)}}} [options]")
        print(f"condistill train: error: the condition comes first: {hint}", file=sys.stderr)
        return 2
    if condition not in condition_names():
        close = difflib.get_close_matches(condition, list(RECIPES), n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(RECIPES)}"
        print(f"condistill train: error: unknown condition {condition!r}; {hint} (condistill train --help "
              "describes them)", file=sys.stderr)
        return 2
    return recipe_main(condition, rest, prog=f"condistill train {condition}")


def _export_parser() -> argparse.ArgumentParser:
    from condistill.publish.formats import DEFAULT_DTYPE, DTYPE_ALIASES, DTYPES, FORMATS

    ex = command_parser(
        "condistill export", "Write a run's adapter as a file other tools (A1111, ComfyUI, diffusers' single-file and "
        "kohya loaders) read: " + "; ".join(f"{k}: {v[1]} (kind {' or '.join(v[0])})" for k, v in FORMATS.items())
        + ". Beside OUT it writes OUT_comfyui.json, a ComfyUI workflow that samples the student as trained (or says "
        "why there is none). Every output is written under a temporary name and renamed into place when complete.")
    ex.add_argument("run", help="a run folder or exported adapter folder")
    ex.add_argument("--format", required=True, choices=list(FORMATS), help="the file format to write")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")
    ex.add_argument("--adapter-out", help="kohya: folder for the condition adapter [OUT_condition_adapter]")
    ex.add_argument("--dtype", type=str.lower, choices=[*DTYPES, *DTYPE_ALIASES], default=DEFAULT_DTYPE,
                    help=f"the tensors' dtype in the written files; float32 keeps them unchanged [{DEFAULT_DTYPE}]")
    ex.add_argument("--overwrite", action="store_true", help="replace --out, an earlier export's --adapter-out "
                    "folder (whole) and a workflow file you edited; a folder holding other files is never replaced")
    return ex


def _export(args) -> int:
    from condistill.publish.formats import default_adapter_out, export

    args.out = str(Path(args.out).expanduser())  # checked and written at the same place, ~ included
    args.adapter_out = str(Path(args.adapter_out).expanduser()) if args.adapter_out else None
    check_output(args.out, "--out", "file")
    if args.format == "kohya":
        check_output(args.adapter_out or default_adapter_out(args.out), "--adapter-out", "folder")
    log = lambda msg: print(f"condistill export: {msg}", file=sys.stderr)  # noqa: E731
    result = export(args.run, args.format, args.out, adapter_out=args.adapter_out, overwrite=args.overwrite,
                    dtype=args.dtype, log=log)
    for note in result.notes:
        print(f"condistill export: note: {note}", file=sys.stderr)
    print(result.instructions)
    return 0


def _cache_parser() -> argparse.ArgumentParser:
    from condistill.config import DEFAULT_BASE
    from condistill.data.cache_writer import DTYPES

    ca = command_parser(
        "condistill cache", "Compute once what the frozen encoders compute from the training data (VAE latents, "
        "caption embeddings, condition tensors) and store it in safetensors shards; train on it with --data OUT. The "
        "cache records the base, resolution, condition and seed, and a run with other ones refuses it. "
        "condistill cache --verify DIR checks every shard of an existing cache instead.",
        epilog="Defaults are shown in brackets.")
    ca.add_argument("--condition", choices=condition_names(),
                    help="the condition the run trains (required to build)")
    ca.add_argument("--data", help="the training data source, as for condistill train --data (required to build)")
    ca.add_argument("--out", help="the cache folder to write (required to build)")
    ca.add_argument("--verify", metavar="DIR", help="check every shard of the cache DIR now (size, SHA-256, header, "
                    "items, finite values) and the data against the recorded source, then stop; a damaged cache "
                    "ends in one line naming its shards and the command that rebuilds it (status 1)")
    ca.add_argument("--base", default=DEFAULT_BASE, help=f"the run's base model [{DEFAULT_BASE}]")
    ca.add_argument("--resolution", type=int, default=0, help="the run's resolution in pixels [0: the base's native one]")
    ca.add_argument("--seed", type=int, default=0, help="the run's seed: it fixes every item's condition [0]")
    ca.add_argument("--condition-options", type=json_object, default=None, metavar="JSON",
                    help="the run's condition options, a JSON object [none]")
    ca.add_argument("--data-options", type=json_object, default=None, metavar="JSON",
                    help="the run's data options, a JSON object [none]")
    ca.add_argument("--batch-size", type=int, default=16, help="images encoded at once [16]")
    ca.add_argument("--device", default="cpu", help="torch device, e.g. cuda [cpu]")
    ca.add_argument("--dtype", choices=list(DTYPES), default="float16",
                    help="storage of latents, embeddings and conditions not exact in uint8 [float16]")
    ca.add_argument("--shard-size", type=int, default=256, help="items per safetensors shard [256]")
    ca.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out (once the new one "
                    "is complete)")
    return ca


def _cache_arguments(args) -> None:
    """``--verify DIR`` alone, or ``--condition``, ``--data`` and ``--out`` to build (a usage error, status 2)."""
    build = {"--condition": args.condition, "--data": args.data, "--out": args.out}
    if args.verify is not None:
        given = [flag for flag, value in build.items() if value is not None]
        if given:
            print(f"condistill cache: error: --verify DIR checks an existing cache; it takes no {', '.join(given)} "
                  "(to build a cache, leave --verify out)", file=sys.stderr)
            raise SystemExit(2)
        return
    missing = [flag for flag, value in build.items() if value is None]
    if missing:
        print(f"condistill cache: error: the following arguments are required: {', '.join(missing)} (or --verify "
              "DIR to check a cache)", file=sys.stderr)
        raise SystemExit(2)


def _cache(args) -> int:
    from condistill.data.cache_writer import cache_command

    _cache_arguments(args)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.verify is not None:
        from condistill.data.cache import verify_cache

        if not Path(args.verify).is_dir():
            raise FileNotFoundError(f"--verify {args.verify}: no such cache folder")
        verify_cache(args.verify, log=log)
        return 0
    nonnegative(args, "batch_size", "shard_size", least=1)
    nonnegative(args, "seed", "resolution")
    check_device(args.device)
    check_output(args.out, "--out", "folder")
    condition = condition_from_options(args.condition, args.condition_options or {})
    resolution = check_resolution(args.base, args.resolution)
    check_data_source(args.data, resolution, args.data_options or {}, condition.record_conditioning)
    out = cache_command(condition=args.condition, data=args.data, out=args.out, base=args.base,
                        resolution=args.resolution, batch_size=args.batch_size, device=args.device, seed=args.seed,
                        condition_options=args.condition_options, data_options=args.data_options,
                        dtype=args.dtype, shard_size=args.shard_size, overwrite=args.overwrite, log=log)
    print(out)
    return 0


COMMANDS = {"train": "one distillation run: condistill train CONDITION [options]",
            "cache": "compute the frozen encoders' outputs once: condistill cache --condition C --data SRC --out DIR "
                     "(--verify DIR checks one)",
            "eval": "score students and baselines on held-out synthetic scenes or your own images (--data)",
            "export": "write a run's adapter in a format other tools read: condistill export RUN --format F --out FILE",
            "push": "upload a run's export to the Hugging Face hub: condistill push RUN REPO_ID",
            "demo": "see students live in the browser: condistill demo RUN [RUN ...] (pip install 'condistill[demo]')"}


def _eval_parser():  # imported when used: a training run never imports the evaluation
    from condistill.evaluation.command import eval_parser
    return eval_parser()


def _eval(args) -> int:
    from condistill.evaluation.command import eval_command
    return eval_command(args)


def main(argv=None) -> int:
    """``condistill COMMAND ...``: the status of the command (0, 1 for a refused input or a stopped run, 2 for a
    command line that does not parse). ``condistill --debug COMMAND`` (or ``--debug`` among the command's
    options, or ``CONDISTILL_DEBUG=1``) shows the traceback of an error instead of its one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == DEBUG_FLAG
    argv = argv[1:] if debug else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: condistill [{DEBUG_FLAG}] {{{','.join(COMMANDS)}}} ...\n\nconditional diffusion distillation\n\n"
              + "\n".join(f"  {k:7s} {v}" for k, v in COMMANDS.items())
              + f"\n\n  {DEBUG_FLAG}: {DEBUG_HELP}; an error otherwise ends in one line and status 1 (2: a command "
              "line that does not parse)", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:] + ([DEBUG_FLAG] if debug else [])
    if command == "train":
        return _train(rest)
    commands = {"eval": (_eval_parser, _eval), "cache": (_cache_parser, _cache), "export": (_export_parser, _export)}
    if command in commands:
        parser, run = commands[command]
        return guarded(f"condistill {command}", lambda: run(parser().parse_args(rest)), rest)
    if command == "push":
        from condistill.publish.push import push_main
        return guarded("condistill push", lambda: push_main([w for w in rest if w != DEBUG_FLAG]), rest)
    if command == "demo":
        from condistill.demo import main as demo_main
        return guarded("condistill demo", lambda: demo_main(rest), rest)
    close = difflib.get_close_matches(command, list(COMMANDS), n=1)
    hint = f"did you mean {close[0]}?" if close else f"the commands are {', '.join(COMMANDS)}"
    print(f"condistill: error: unknown command {command!r}; {hint} (condistill --help describes them)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
