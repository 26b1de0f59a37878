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
import inspect
import json
import sys
import typing

from condistill.cli_parsing import CommandParser, FlagWithOldValue, cli_form, did_you_mean, json_object, parse_bool
from condistill.config import ConfigError, DistillConfig, SettingError, option_choices
from condistill.presets import DEFAULT_PRESET, RECIPES, presets_for, recipe_description

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
    return parser


def config_from_args(condition: str, argv=None, prog: str | None = None) -> DistillConfig:
    """The validated :class:`DistillConfig` of ``condistill train CONDITION ARGV``.

    Precedence: the explicit options, then the chosen preset, then the dataclass defaults.
    Invalid values exit with status 2 and every problem listed.
    """
    presets = presets_for(condition)
    parser = build_parser(condition, presets, recipe_description(condition), prog=prog,
                          preset=chosen_preset(presets, argv))
    args = vars(parser.parse_args(argv))
    preset = {k: v for k, v in presets[args.pop("preset")].items() if not k.startswith("_")}
    values = {"condition": condition, **preset, **{k: v for k, v in args.items() if v is not None}}
    try:
        return DistillConfig(**values)
    except ConfigError as err:  # the options as the user wrote them: --max-steps 0, not max_steps=0
        parser.exit(2, f"{parser.prog}: error: {cli_form(str(err))}\n")


def _run_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a run raises for the user to act on (their messages say what to do)."""
    from condistill.data.cache import CacheMismatchError
    from condistill.data.skips import EmptySourceError, TooManySkipsError
    from condistill.training.checkpoint import UnhealthyCheckpointError
    from condistill.training.run_folder import ResumeMismatchError, RunLockedError

    # OSError: a file in the way, a missing base or data folder, a full disk (each message names the path);
    # SettingError: a resolution or precision this base or machine cannot run
    return (OSError, RunLockedError, ResumeMismatchError, UnhealthyCheckpointError, EmptySourceError,
            TooManySkipsError, FloatingPointError, CacheMismatchError, SettingError)


def _adapter_option_problem(cfg: DistillConfig) -> str | None:
    """A ``--adapter-options`` name the adapter does not take (one line), or ``None``.

    Checked before any model loads; the values are checked when the student is built, which needs
    the base's UNet.
    """
    from condistill.adapters.student import get_adapter_class

    params = inspect.signature(get_adapter_class(cfg.adapter).__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    names = [n for n in params if n not in ("self", "unet", "condition_channels")]
    for name in cfg.adapter_options:
        if name not in names:
            return (f"--adapter-options: the {cfg.adapter} adapter has no option {name!r}"
                    + did_you_mean(name, names, "option") + f" (its options: {', '.join(names)})")
    return None


def recipe_main(condition: str, argv=None, prog: str | None = None) -> int:
    """Run ``condistill train CONDITION`` with ``argv`` (what ``recipes/<condition>.py`` calls).

    Returns 0 on success. What can be checked before a model loads is checked first: the options
    (status 2), then the files the condition needs (:meth:`Condition.check`). A run stopped by one
    of the errors of :func:`_run_errors` prints its message in one line, the options it names as
    they are typed (no traceback), and returns 1.
    """
    cfg = config_from_args(condition, argv, prog)
    prog = prog or f"condistill train {condition}"
    problem = _adapter_option_problem(cfg)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    from condistill.conditions import get_condition
    from condistill.training.loop import distill

    try:
        try:  # the condition's options, and the files it needs (the depth estimator's weights), before any model
            built = get_condition(cfg.condition, **cfg.condition_options)
        except (ValueError, TypeError) as error:
            print(f"{prog}: error: --condition-options {json.dumps(cfg.condition_options)}: {error}", file=sys.stderr)
            return 2
        built.check()
        out = distill(cfg)
    except _run_errors() as error:
        print(f"{prog}: error: {cli_form(str(error))}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:  # one line for the run, not one per process
        print(f"adapter written to {out} (load it with condistill.load_adapter({str(out)!r}))", file=sys.stderr)
    return 0


def _train(argv: list[str]) -> int:
    usage = f"usage: condistill train {{{','.join(RECIPES)}}} [options]  (condistill train CONDITION --help lists them)"
    if not argv or argv[0] in ("-h", "--help"):
        lines = [usage, "", "Distil a frozen text-to-image teacher into a few-step conditional model.", ""]
        lines += [f"  {name:8s} {text}" for name, (text, _) in RECIPES.items()]
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    condition, rest = argv[0], argv[1:]
    if condition.startswith("-"):
        later = [word for word in rest if word in RECIPES]
        hint = (f"condistill train {later[0]} {' '.join(w for w in argv if w != later[0])}" if later
                else f"condistill train {{{','.join(RECIPES)}}} [options]")
        print(f"condistill train: error: the condition comes first: {hint}", file=sys.stderr)
        return 2
    if condition not in RECIPES:
        close = difflib.get_close_matches(condition, list(RECIPES), n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(RECIPES)}"
        print(f"condistill train: error: unknown condition {condition!r}; {hint} (condistill train --help "
              "describes them)", file=sys.stderr)
        return 2
    return recipe_main(condition, rest, prog=f"condistill train {condition}")


def _eval(args) -> int:
    from condistill.evaluation.evaluate import default_rows, evaluate, markdown_table, parse_rows, skipped_note

    if args.row:
        rows = parse_rows(args.row)
    elif args.student:
        rows = default_rows(args.student, args.baseline, args.condition, args.guidance)
    else:
        print("condistill eval: give --student (and optionally --baseline) or one or more --row", file=sys.stderr)
        return 2
    if args.prompts and not args.data:
        print("condistill eval: --prompts needs --data (the synthetic scenes come with their own prompts)", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    note = ""
    if args.data:  # the user's own images: conditions made as in training, metrics without the judge
        from condistill.evaluation.user_data import data_note, evaluate_data
        try:
            report = evaluate_data(args.condition, rows, args.data, base=args.base, num_images=args.num_images,
                                   batch_size=args.batch_size, seed=args.seed, prompts=args.prompts, out_dir=args.out,
                                   device=args.device, cache_dir=args.cache_dir, log=log)
        except (OSError, ValueError) as error:
            print(f"condistill eval: error: {error}", file=sys.stderr)
            return 1
        note = data_note(report)
    else:
        report = evaluate(args.condition, rows, base=args.base, num_images=args.num_images, batch_size=args.batch_size,
                          seed=args.seed, judge_path=args.judge, out_dir=args.out, device=args.device,
                          cache_dir=args.cache_dir, log=log)
    skipped = skipped_note(report)  # after a blank line: a line right below a markdown table would join it
    table = note + markdown_table(report) + ("\n" + skipped if skipped else "")
    print(table)
    if args.student and not args.row:  # a local run's model card records what was measured
        from condistill.publish.card import record_eval
        options = {k: v for k, v in vars(args).items() if not (args.data and k == "judge")}  # no judge with --data
        record_eval(args.student, table, options, log=log)
    if args.out:
        extra = ", conditions.safetensors" if args.data else ""
        print(f"wrote {args.out}/results.json, results.md, samples.png{extra}", file=sys.stderr)
    else:
        print(json.dumps(report, indent=2))
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    ev = CommandParser(
        prog="condistill eval", description="Score students and baselines on held-out synthetic scenes (fidelity, "
        "Frechet distance on the judge's features, prompt accuracy, seconds per image), or with --data on your own "
        "images (fidelity, Inception FID, LPIPS, CLIP score where available, seconds per image).",
        epilog="Defaults are shown in brackets.")
    ev.add_argument("--condition", required=True, choices=list(RECIPES), help="the condition the adapters were trained for")
    ev.add_argument("--student", help="distilled adapter folder (rows at 1, 2 and 4 steps)")
    ev.add_argument("--baseline", help="conventionally trained adapter folder (50 DDIM+CFG, 4 DDIM, 4 LCM rows)")
    ev.add_argument("--row", action="append", help="custom row NAME=MODEL[:SAMPLER[:STEPS[:GUIDANCE[:START]]]]; MODEL is "
                    "an adapter folder, 'teacher' or 'bicubic'; START, a grid timestep (e.g. 499), starts a codi sampler "
                    "from the condition's own image noised to it (sr, inpaint; the zero latent for edge, depth); repeatable (replaces the default rows)")
    ev.add_argument("--base", help="base model [the one recorded with the first adapter]")
    ev.add_argument("--guidance", type=float, default=4.0,
                    help="CFG scale of the 50-step baseline and teacher rows (every documented result uses 4) [4.0]")
    ev.add_argument("--data", help="score on your own images instead: any training data source (image folder, "
                    "datasets id/folder, .tar shards); the first --num-images usable items in the order seeded by "
                    "--seed, conditions made as in training, metrics without the judge [synthetic held-out scenes]")
    ev.add_argument("--prompts", help="with --data: a prompt, or a file of prompts (one a line, cycled), instead of "
                    "the items' captions [the captions]")
    ev.add_argument("--num-images", type=int, default=256, help="held-out scenes (or --data items) scored per row [256]")
    ev.add_argument("--batch-size", type=int, default=64, help="images sampled at once [64]")
    ev.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the sampling noise [0]")
    ev.add_argument("--judge", default="embedded:judge", help="judge folder [embedded:judge, the packaged judge]")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cuda [cpu]")
    ev.add_argument("--cache-dir", help="folder that keeps teacher samples across conditions (they ignore the "
                    "condition) [no cache]")
    ev.add_argument("--out", help="folder for results.json, results.md and samples.png [print the JSON instead]")
    return ev


def _export_parser() -> argparse.ArgumentParser:
    from condistill.publish.formats import FORMATS

    ex = CommandParser(
        prog="condistill export", description="Write a run's adapter as a file other tools (A1111, ComfyUI, "
        "diffusers' single-file and kohya loaders) read: " + "; ".join(f"{k}: {v[1]} (kind {v[0]!r})"
                                                                     for k, v in FORMATS.items()) + ".")
    ex.add_argument("run", help="a run folder or exported adapter folder")
    ex.add_argument("--format", required=True, choices=list(FORMATS), help="the file format to write")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")
    ex.add_argument("--adapter-out", help="kohya: folder for the condition adapter [OUT_condition_adapter]")
    ex.add_argument("--overwrite", action="store_true", help="replace --out (and --adapter-out) if they exist")
    return ex


def _export(args) -> int:
    from condistill.publish.formats import export

    try:
        result = export(args.run, args.format, args.out, adapter_out=args.adapter_out, overwrite=args.overwrite)
    except (OSError, ValueError) as error:
        print(f"condistill export: error: {error}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"condistill export: note: {note}", file=sys.stderr)
    print(result.instructions)
    return 0


def _cache_parser() -> argparse.ArgumentParser:
    from condistill.config import DEFAULT_BASE
    from condistill.data.cache_writer import DTYPES

    ca = CommandParser(
        prog="condistill cache", description="Compute once what the frozen encoders compute from the training data "
        "(VAE latents, caption embeddings, condition tensors) and store it in safetensors shards; train on it with "
        "--data OUT. The cache records the base, resolution, condition and seed, and a run with other ones refuses it.",
        epilog="Defaults are shown in brackets.")
    ca.add_argument("--condition", required=True, choices=list(RECIPES), help="the condition the run trains")
    ca.add_argument("--data", required=True, help="the training data source, as for condistill train --data")
    ca.add_argument("--out", required=True, help="the cache folder to write")
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


def _cache(args) -> int:
    from condistill.data.cache_writer import cache_command

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        out = cache_command(condition=args.condition, data=args.data, out=args.out, base=args.base,
                            resolution=args.resolution, batch_size=args.batch_size, device=args.device, seed=args.seed,
                            condition_options=args.condition_options, data_options=args.data_options,
                            dtype=args.dtype, shard_size=args.shard_size, overwrite=args.overwrite, log=log)
    except (OSError, ValueError, TypeError) as error:
        print(f"condistill cache: error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


COMMANDS = {"train": "one distillation run: condistill train CONDITION [options]",
            "cache": "compute the frozen encoders' outputs once: condistill cache --condition C --data SRC --out DIR",
            "eval": "score students and baselines on held-out synthetic scenes or your own images (--data)",
            "export": "write a run's adapter in a format other tools read: condistill export RUN --format F --out FILE",
            "push": "upload a run's export to the Hugging Face hub: condistill push RUN REPO_ID"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: condistill {{{','.join(COMMANDS)}}} ...\n\nconditional diffusion distillation\n\n"
              + "\n".join(f"  {k:7s} {v}" for k, v in COMMANDS.items()), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "train":
        return _train(argv[1:])
    if argv[0] == "eval":
        return _eval(_eval_parser().parse_args(argv[1:]))
    if argv[0] == "cache":
        return _cache(_cache_parser().parse_args(argv[1:]))
    if argv[0] == "export":
        return _export(_export_parser().parse_args(argv[1:]))
    if argv[0] == "push":
        from condistill.publish.push import push_main
        return push_main(argv[1:])
    close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
    hint = f"did you mean {close[0]}?" if close else f"the commands are {', '.join(COMMANDS)}"
    print(f"condistill: error: unknown command {argv[0]!r}; {hint} (condistill --help describes them)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
