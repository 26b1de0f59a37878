"""The parser every ``condistill`` command shares, and how its messages name options.

- :class:`CommandParser`: options are taken only when spelt in full, and every error is one line
  (``PROG: error: ...``, status 2); a misspelt option, command or choice gets a "did you mean".
- :class:`FlagWithOldValue`: a bare flag (``--overwrite``) that still reads its old ``true``/``false``
  value, with a deprecation warning.
- :func:`cli_form`: a message's :class:`~condistill.config.DistillConfig` fields as the command's
  options (``max_steps=0`` -> ``--max-steps 0``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys

from condistill.config import DistillConfig

__all__ = ["CommandParser", "FlagWithOldValue", "cli_form", "did_you_mean", "json_object", "parse_bool"]


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
