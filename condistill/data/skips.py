"""Skip bookkeeping shared by every data source.

A source never stops on one bad item: the code that reads an item raises
:class:`SkipItem` with a short reason (``"corrupt"``, ``"too_small"``, ...), the source
counts it in its :class:`SourceStats` and goes on. If a whole pass yields nothing, the
source raises :class:`EmptySourceError`, built by :meth:`SourceStats.empty_error`, which
says what was skipped, why, and what to do about it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["EmptySourceError", "SkipItem", "SourceStats"]

# What a user can do about each skip reason; used in the empty-source error.
_SKIP_ADVICE = {
    "too_small": "lower min_size or use larger images",
    "corrupt": "re-export or remove the unreadable files",
    "truncated": "re-download the truncated files",
    "missing_file": "fix the file names listed in the metadata",
    "corrupt_conditioning": "fix the conditioning images",
    "no_image": "each sample needs an image member (jpg, jpeg, png or webp)",
    "corrupt_json": "fix the .json members",
}


class EmptySourceError(ValueError):
    """Raised when a data source produced no usable record at all."""


class SkipItem(Exception):
    """Internal signal: the current item is unusable and must be skipped.

    Attributes:
        reason: short counter name (``"corrupt"``, ``"too_small"``, ...).
        detail: human readable explanation (kept in :attr:`SourceStats.examples`).
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SourceStats:
    """Counts of what a source did to its items, by reason.

    Each item (identified by its key) is counted once, even if it is read again in a
    later epoch.

    Attributes:
        name: the source's description, used in messages.
        seen: distinct items looked at.
        yielded: distinct items that produced a record.
        converted: conversions applied to yielded items, e.g. ``converted["rgba"]``.
        skipped: items dropped, e.g. ``skipped["corrupt"]``, ``skipped["too_small"]``.
        errors: problems above the item level (an unreadable or truncated tar shard).
        examples: up to three ``"key: detail"`` strings per skip or error reason.
    """

    name: str = "data source"
    seen: int = 0
    yielded: int = 0
    converted: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    _observed: set = field(default_factory=set, init=False, repr=False, compare=False)

    def observe(self, key: str, conversions: Iterable[str] = (), skipped: SkipItem | None = None) -> None:
        """Record the outcome of one item; repeated observations of a key are ignored.

        Args:
            key: the item's stable identifier.
            conversions: conversion reasons applied to the item (counted if it was kept).
            skipped: the :class:`SkipItem` that dropped it, or ``None`` if it was kept.
        """
        if key in self._observed:
            return
        self._observed.add(key)
        self.seen += 1
        if skipped is None:
            self.yielded += 1
            self.converted.update(conversions)
        else:
            self.skipped[skipped.reason] += 1
            self._example(skipped.reason, f"{key}: {skipped.detail}" if skipped.detail else key)

    def error(self, reason: str, detail: str) -> None:
        """Count a problem that is not tied to one item (e.g. a truncated shard)."""
        self.errors[reason] += 1
        self._example(reason, detail)

    def _example(self, reason: str, text: str) -> None:
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < 3:
            bucket.append(text)

    def summary(self) -> str:
        """A one-paragraph human readable report of the counts."""
        lines = [f"{self.name}: {self.yielded} of {self.seen} items used"]
        if self.converted:
            lines.append("  converted: " + _format_counter(self.converted))
        if self.skipped:
            lines.append("  skipped: " + _format_counter(self.skipped))
        if self.errors:
            lines.append("  errors: " + _format_counter(self.errors))
        for reason, texts in sorted(self.examples.items()):
            lines.append(f"  e.g. {reason}: " + "; ".join(texts))
        return "\n".join(lines)

    def empty_error(self, hint: str = "") -> EmptySourceError:
        """Build the error raised when the source yielded nothing.

        Args:
            hint: extra advice from the source (e.g. which files it looked for).
        """
        if self.seen == 0 and not self.errors:
            msg = f"{self.name} is empty: it contains no items."
        elif self.seen == 0:
            msg = f"{self.name} is empty: no item could be read; errors: {_format_counter(self.errors)}."
            for reason, texts in sorted(self.examples.items()):
                msg += f" Example {reason}: {texts[0]}."
        else:
            msg = f"{self.name} is empty: all {self.seen} items were skipped"
            if self.skipped:
                msg += " (" + _format_counter(self.skipped) + ")"
            if self.errors:
                msg += "; errors: " + _format_counter(self.errors)
            msg += "."
            advice = [_SKIP_ADVICE[r] for r in self.skipped if r in _SKIP_ADVICE]
            if advice:
                msg += " To fix: " + "; ".join(advice) + "."
            for reason, texts in sorted(self.examples.items()):
                msg += f" Example {reason}: {texts[0]}."
        if hint:
            msg += " " + hint
        return EmptySourceError(msg)


def _format_counter(counter: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))
