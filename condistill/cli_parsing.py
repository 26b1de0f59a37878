"""The parser every ``condistill`` command shares, and how its messages name options.

- :class:`CommandParser`: options are taken only when spelt in full, and every error is one line
  (``PROG: error: ...``, status 2); a misspelt option, command or choice gets a "did you mean".
- :class:`FlagWithOldValue`: a bare flag (``--overwrite``) that still reads its old ``true``/``false``
  value, with a deprecation warning.
- :func:`cli_form`: a message's :class:`~condistill.config.DistillConfig` fields as the command's
  options (``max_steps=0`` -> ``--max-steps 0``).
- :func:`guarded`: runs a command; a refused input or a stopped run (``ValueError``, ``OSError`` and the
  few run errors of :func:`_known_errors`) prints ONE line, ``PROG: error: MESSAGE``, and gives status 1;
  anything else is a bug: its traceback, then one line asking for a report. ``--debug`` or
  ``CONDISTILL_DEBUG=1`` (:func:`debug_requested`) shows the traceback of every error instead.
- :func:`check_output`: a ``--out``/``--output-dir`` that cannot be written (under a file, a file
  where a folder goes, no write permission) is refused before the work starts.
- :func:`adapter_option_problem`, :func:`condition_from_options`, :func:`check_data_source`: the
  ``--adapter-options``, ``--condition-options`` and ``--data``/``--data-options`` of a run,
  checked without a model; :func:`warmup_warning`: a warm-up the run never finishes.

Exit statuses: 0 success; 1 a refused input or a stopped run; 2 a command line that does not parse
(argparse: an unknown option or command, a missing argument, a value not of the option's type or
choices, a JSON option that is not an object).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import json
import os
import re
import sys
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any, Callable

from condistill.config import DistillConfig

__all__ = ["CommandParser", "FlagWithOldValue", "cli_form", "did_you_mean", "json_object", "parse_bool", "DEBUG_ENV",
           "debug_requested", "guarded", "one_line", "check_output", "adapter_option_problem",
           "condition_from_options", "check_data_source", "warmup_warning"]


def did_you_mean(word: str, candidates, what: str) -> str:
    """``"; did you mean X?"`` for the candidate closest to ``word``, else ``", and no <what> is close to it"``."""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {close[0]}?" if close else f", and no {what} is close to it"


class CommandParser(argparse.ArgumentParser):
    """The parser of every ``condistill`` command: no abbreviated options, and errors in one line.

    An option is taken only when spelt in full (``--max-step`` is not ``--max-steps``). A misspelt
    option gets ``PROG: error: unrecognized option --max-step; did you mean --max-steps? (PROG
    --help lists every option)``; any other error (a bad value, an invalid choice, a missing
    argument) is ``PROG: error: MESSAGE``, without the usage block. Errors exit with status 2.
    """

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return parsed

    def _unknown_options(self) -> list[str]:
        """The options of the arguments being parsed that this parser does not have."""
        return [word for word in getattr(self, "_argv", []) if word.startswith("--") and word != "--"
                and word.split("=", 1)[0] not in self._option_string_actions]

    def _unrecognized(self, extras: list[str]) -> str:
        options = [s for s in self._option_string_actions if s.startswith("--")]
        clauses, after_option = [], False
        for word in extras:
            if word.startswith("-") and not _is_number(word):
                name = word.split("=", 1)[0]
                clauses.append(f"unrecognized option {name}" + did_you_mean(name, options, "option"))
                after_option = True
            elif not after_option:  # the value of an unrecognized option is not reported again
                clauses.append(f"unexpected argument {word!r}")
        *first, last = clauses or [f"unrecognized arguments: {' '.join(extras)}"]
        return " ".join([c if c.endswith("?") else c + "." for c in first] + [last])

    def error(self, message: str):
        message = " ".join(str(message).split())  # one line
        if message.startswith("the following arguments are required") and self._unknown_options():
            message = self._unrecognized(self._unknown_options())  # "--conditon edge": the misspelling says why
        if message.startswith(("unrecognized option", "unexpected argument")):
            message += f" ({self.prog} --help lists every option)"
        else:
            choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
            if choice:
                allowed = [c.strip().strip("'") for c in choice.group(2).split(",")]
                close = difflib.get_close_matches(choice.group(1), allowed, n=1)
                message += f"; did you mean {close[0]}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, showing a flag that still takes a deprecated value (:class:`FlagWithOldValue`) bare."""

    def _format_args(self, action, default_metavar):
        if isinstance(action, FlagWithOldValue):
            return ""
        return super()._format_args(action, default_metavar)

    def _format_action_invocation(self, action):
        if isinstance(action, FlagWithOldValue):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)

    def _format_usage(self, *args, **kwargs):
        return re.sub(r" +\]", "]", super()._format_usage(*args, **kwargs))


class FlagWithOldValue(argparse.Action):
    """A bare flag (``--overwrite`` means true) that still accepts an explicit ``true``/``false``, with a warning.

    The value form is what the option took before it became a flag; it is accepted for one release.
    """

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.update(nargs="?", const=True)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not True:  # an explicit value: the old form
            try:
                parsed = parse_bool(values)
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentError(self, f"takes no value, got {values!r}; write {option_string} alone") \
                    from None
            print(f"{parser.prog}: warning: '{option_string} {values}' is deprecated; write {option_string} "
                  "(or leave it out for false)", file=sys.stderr)
            values = parsed
        setattr(namespace, self.dest, values)


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def json_object(text: str) -> dict:
    """An option's JSON object value (``--condition-options '{"source": "estimator"}'``)."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({error}); write a JSON object such as "
                                         """'{"key": "value"}'""") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; write one such as '{{\"key\": \"value\"}}'")
    return value


_FIELDS = sorted((f.name for f in dataclasses.fields(DistillConfig)), key=len, reverse=True)
# a field named outside a Python call's arguments ("f(x, name=...)" stays as it is)
_FIELD_VALUE = re.compile(r"(?<![(\w.-])(?<!, )(" + "|".join(_FIELDS) + r")=('[^']*'|[^\s,;:)]+)")
_FIELD_NAME = re.compile(r"(?<![-\w.'\"/])(" + "|".join(n for n in _FIELDS if "_" in n) + r")(?![-=/\w]|\.\w)")
_FIELD_KEY = re.compile(r"(?:^|(?<=; )|(?<=: ))(" + "|".join(_FIELDS) + r")(?=: )")  # "seed: 0 -> 1; adapter: ..."


def cli_form(message: str) -> str:
    """``message`` with the options of :class:`DistillConfig` it names in command-line form.

    ``max_skip_fraction=0.1`` becomes ``--max-skip-fraction 0.1``, ``guidance_min`` becomes
    ``--guidance-min``, and in a list of differences ``seed: 0 -> 1`` becomes ``--seed: 0 -> 1``.
    The messages of the configuration and of a run are written for Python callers; the command
    shows them with the options as its user types them.
    """
    def with_value(match: re.Match) -> str:
        value = match.group(2)
        if len(value) > 1 and value[0] == value[-1] == "'" and not any(c.isspace() for c in value):
            value = value[1:-1]
        return f"--{match.group(1).replace('_', '-')} {value}"

    as_typed = lambda match: "--" + match.group(1).replace("_", "-")  # noqa: E731
    message = _FIELD_VALUE.sub(with_value, message)
    return _FIELD_NAME.sub(as_typed, _FIELD_KEY.sub(as_typed, message))


# ---------------------------------------------------------------------- how a command ends
#: the environment variable that, set to 1, shows the traceback of every error (like ``--debug``)
DEBUG_ENV = "CONDISTILL_DEBUG"
DEBUG_FLAG = "--debug"
DEBUG_HELP = f"show the full traceback of an error instead of one line (also {DEBUG_ENV}=1)"


def debug_requested(argv=()) -> bool:
    """``--debug`` among the options of ``argv`` (before a ``--``), or ``CONDISTILL_DEBUG`` set to a true value."""
    words = list(argv)
    words = words[:words.index("--")] if "--" in words else words
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return DEBUG_FLAG in words or env in ("1", "true", "yes", "on")


def one_line(message: str) -> str:
    """``message`` on one line (its line breaks and runs of spaces become single spaces)."""
    return " ".join(str(message).split())


def _known_errors() -> tuple[type[BaseException], ...]:
    """The errors of a stopped run that are neither ``ValueError`` nor ``OSError`` (their messages say what to do)."""
    known: list[type[BaseException]] = [FloatingPointError, MemoryError]  # a diverged run names its step and checkpoint
    if "torch" in sys.modules:  # out of GPU memory: the machine's limit, not a bug
        known.append(sys.modules["torch"].cuda.OutOfMemoryError)
    try:
        from condistill.training.run_folder import RunLockedError
        known.append(RunLockedError)
    except ImportError:  # pragma: no cover - a partial install
        pass
    return tuple(known)


def _raised_by_us(error: BaseException) -> bool:
    """Whether ``error`` is one of condistill's classes or was raised by condistill's code (not by a library)."""
    if type(error).__module__.split(".")[0] == "condistill":
        return True
    frames = traceback.extract_tb(error.__traceback__)
    package = str(Path(__file__).resolve().parent)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package)


def _where(error: BaseException) -> str:
    """The library module that raised ``error`` (``torch.optim.adam``), for a message that came from outside."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "a library"
    path = Path(frames[-1].filename)
    parts = path.with_suffix("").parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1:]
    return ".".join(parts[-3:]) if parts else "a library"


@contextlib.contextmanager
def _one_line_warnings(prog: str, debug: bool):
    """Warnings a command raises (``UserWarning``: condistill's, e.g. an export without checksums) as one
    ``PROG: warning: ...`` line, without Python's file and source line (``--debug`` keeps Python's form)."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, UserWarning) and not issubclass(category, (DeprecationWarning, FutureWarning)):
                print(f"{prog}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def guarded(prog: str, command: Callable[[], int], argv=()) -> int:
    """Run ``command()`` and return its status; an error ends as the module docstring says.

    A ``SystemExit`` (argparse's status 2, ``--help``'s 0) passes through unchanged; Ctrl-C prints one line
    and returns 130.
    """
    debug = debug_requested(argv)
    try:
        with _one_line_warnings(prog, debug):
            return command()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, *_known_errors()) as error:
        if debug:
            raise
        ours = _raised_by_us(error)
        message = cli_form(one_line(error)) if ours else one_line(error)  # our messages name options as typed
        if isinstance(error, OSError) and not message:
            message = type(error).__name__
        elif not ours and not isinstance(error, OSError):
            message = (f"{type(error).__name__} from {_where(error)}: {message} "
                       f"({DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback)")
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - a bug: the traceback, then what to do with it
        if debug:
            raise
        traceback.print_exc()
        print(f"{prog}: internal error ({type(error).__name__}); this is a bug in condistill: please report it "
              "with the command line and the traceback above", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- outputs
def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if os.path.lexists(parent):
            return parent
    return Path(".")


def check_output(path: str | os.PathLike, flag: str, kind: str = "file") -> Path:
    """Refuse an output ``path`` (a ``kind`` of ``"file"`` or ``"folder"``) that cannot be written, before any work.

    Refused: a folder where a file goes or a file where a folder goes, a file among the folders above it,
    and a folder without write permission. Nothing is created.

    Raises:
        NotADirectoryError, IsADirectoryError, PermissionError: one line naming ``flag`` and the path.
    """
    path = Path(path).expanduser()
    if kind == "file" and path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give the path of the file to write")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file, not a folder; give a folder to write, or another path")
    holder = _nearest_existing(path if kind == "folder" and path.is_dir() else path.parent)
    if not holder.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {holder} is a file, not a folder, so nothing can be written below it")
    if not os.access(holder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: no permission to write in {holder}")
    return path


# ---------------------------------------------------------------------- run options
_RESERVED = ("self", "unet", "condition_channels")  # the adapter's arguments that condistill fills in


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a parameter annotation (``int``, ``float | None``, ``Sequence[int]``, ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(_type_ok(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is os.PathLike:
        return isinstance(value, str)
    if origin is not None and origin.__name__ in ("Sequence", "list", "tuple"):
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    return isinstance(value, hint) if isinstance(hint, type) else True


_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true/false values"), type(None): ("null", "nulls"), os.PathLike: ("a string", "strings")}


def _hint_text(hint: Any, plural: bool = False) -> str:
    """An annotation in JSON words: ``int | None`` -> ``an integer or null``, ``Sequence[int]`` -> ``a list of integers``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
        return " or ".join(dict.fromkeys(_hint_text(arg, plural) for arg in args))
    if hint in _WORDS:
        return _WORDS[hint][plural]
    if args:
        return ("lists of " if plural else "a list of ") + _hint_text(args[0], True)
    return getattr(hint, "__name__", str(hint))


def adapter_option_problem(adapter: str, options: dict[str, Any]) -> str | None:
    """A ``--adapter-options`` entry the adapter does not take, or of a type it does not take (one line), or ``None``.

    Checked before any model loads; the arguments condistill fills in itself (the UNet, the condition's
    channels) are not options. Values of the right type are checked when the student is built.
    """
    from condistill.adapters.student import get_adapter_class

    init = get_adapter_class(adapter).__init__
    params = inspect.signature(init).parameters
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: names only
        hints = {}
    names = [n for n, p in params.items() if n not in _RESERVED and p.kind is not p.VAR_KEYWORD]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name, value in options.items():
        if name in _RESERVED:
            return f"--adapter-options: {name!r} is set by condistill, not an option (the options: {', '.join(names)})"
        if name not in names and not open_ended:
            return (f"--adapter-options: the {adapter} adapter has no option {name!r}"
                    + did_you_mean(name, names, "option") + f" (its options: {', '.join(names)})")
        if name in hints and not _type_ok(value, hints[name]):
            return (f"--adapter-options: {name} of the {adapter} adapter takes {_hint_text(hints[name])}, "
                    f"got {json.dumps(value)}")
    return None


def condition_from_options(name: str, options: dict[str, Any]):
    """The condition ``name`` built with ``--condition-options`` (its weights checked, none loaded).

    Raises:
        ValueError: one line naming the options; the condition's missing files raise their own error.
    """
    from condistill.conditions import get_condition

    try:
        condition = get_condition(name, **options)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--condition-options {json.dumps(options)}: {one_line(error)}") from error
    condition.check()
    return condition


def check_data_source(spec: str, resolution: int, options: dict[str, Any], conditioning: str | None = None) -> None:
    """Open ``--data`` with ``--data-options`` as a run will (no model; ``conditioning``: the condition's
    ``record_conditioning``): a missing column, an unknown option or a malformed spec is refused here in one
    line. A latent cache is checked by the run itself."""
    from condistill.data.cache import is_cache
    from condistill.data.sources import open_source

    if is_cache(spec):
        return
    try:
        open_source(spec, resolution=resolution, conditioning=conditioning, **options)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as error:
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        shown = f" --data-options {json.dumps(options)}" if options else ""
        kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
        raise kind(f"--data {spec}{shown}: {one_line(text)}") from error


def warmup_warning(cfg) -> str | None:
    """One line when ``--lr-warmup-steps`` is not shorter than the run, so the learning rate never reaches
    ``--learning-rate`` (the warm-up rises linearly from 0 at step 0), else ``None``."""
    if not cfg.lr_warmup_steps or cfg.lr_warmup_steps < cfg.max_steps:
        return None
    peak = (cfg.max_steps - 1) / cfg.lr_warmup_steps
    return (f"--lr-warmup-steps {cfg.lr_warmup_steps} is not shorter than the run (--max-steps {cfg.max_steps}): "
            f"the learning rate rises only to {peak:.0%} of --learning-rate {cfg.learning_rate:g}; pass a shorter "
            "--lr-warmup-steps (0 for none) to train at the full rate")


def nonnegative(args, *names: str, least: int = 0) -> None:
    """Refuse an integer option below ``least`` (one line naming it as typed)."""
    for name in names:
        value = getattr(args, name)
        if value < least:
            what = "at least 1" if least == 1 else "0 or more"
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be {what}")


def check_device(device: str) -> None:
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {device}: not a torch device ({error}); write cpu, cuda or cuda:0") from None


def command_parser(prog: str, description: str, condition: str | None = None, **kwargs) -> CommandParser:
    """A command's parser with ``--debug``, and ``--condition`` (required) when ``condition`` gives its help."""
    parser = CommandParser(prog=prog, description=description, **kwargs)
    if condition:
        from condistill.presets import condition_names

        parser.add_argument("--condition", required=True, choices=condition_names(), help=condition)
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return parser
