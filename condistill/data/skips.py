"""Skip bookkeeping shared by every data source.

A source never stops on one bad item: the code that reads an item raises
:class:`SkipItem` with a short reason (``"corrupt"``, ``"too_small"``, ...), the source
counts it in its :class:`SourceStats` and goes on. If a whole pass yields nothing, the
source raises :class:`EmptySourceError`, built by :meth:`SourceStats.empty_error`, which
says what was skipped, why, and what to do about it.

Every skipped item is also kept in :attr:`SourceStats.skipped_items` (key, reason and detail,
up to :data:`ITEM_LIST_CAP` of them), which :meth:`SourceStats.report` turns into the
``data_report.json`` of a run. A training run watches the counts as it reads (see
:mod:`condistill.data.report`) and stops with :class:`TooManySkipsError` when too large a
fraction of the items it has seen were unusable.

Observations made in a DataLoader worker process stay in that worker's copy of the stats. To
bring them to the main process, :meth:`SourceStats.open_outbox` makes the stats also queue
every new observation as a small picklable event; :meth:`SourceStats.drain` hands the queued
events over (``ConditionDataset.collate`` puts them in the batch) and
:meth:`SourceStats.apply` replays them into another ``SourceStats``, counting each key once.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["EmptySourceError", "ITEM_LIST_CAP", "SkipItem", "SourceStats", "TooManySkipsError", "skip_advice"]

#: How many skipped items (and shard-level errors) a :class:`SourceStats` lists one by one;
#: beyond it they are only counted (``skipped_items_omitted``).
ITEM_LIST_CAP = 10_000

# What a user can do about each skip reason; used in the empty-source error.
_SKIP_ADVICE = {
    "too_small": "lower min_size or use larger images",
    "corrupt": "re-export or remove the unreadable files",
    "truncated": "re-download the truncated files",
    "missing_file": "fix the file names listed in the metadata",
    "corrupt_conditioning": "fix the conditioning images",
    "missing_conditioning": "give every image its control image (a conditioning_image column, a file in "
                            "conditioning_dir, or a conditioning.png shard member)",
    "mismatched_conditioning": "make each control image the shape of its image",
    "no_image": "each sample needs an image member (jpg, jpeg, png or webp)",
    "corrupt_json": "fix the .json members",
}


class EmptySourceError(ValueError):
    """Raised when a data source produced no usable record at all."""


class TooManySkipsError(ValueError):
    """Raised by a training run when the fraction of unusable data items exceeds ``max_skip_fraction``."""


def skip_advice(reasons) -> list[str]:
    """What a user can do about the given skip reasons (known reasons only, in the given order)."""
    return [_SKIP_ADVICE[r] for r in reasons if r in _SKIP_ADVICE]


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
        skipped_items: every skipped item as ``(key, reason, detail)``, in the order seen, up to
            :data:`ITEM_LIST_CAP`; ``skipped_items_omitted`` counts those beyond.
        error_items: every error as ``(reason, detail)``, capped the same way
            (``error_items_omitted``).
    """

    name: str = "data source"
    seen: int = 0
    yielded: int = 0
    converted: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    skipped_items: list = field(default_factory=list, repr=False)
    skipped_items_omitted: int = 0
    error_items: list = field(default_factory=list, repr=False)
    error_items_omitted: int = 0
    _observed: set = field(default_factory=set, init=False, repr=False, compare=False)
    _outbox: list | None = field(default=None, init=False, repr=False, compare=False)

    def observe(self, key: str, conversions: Iterable[str] = (), skipped: SkipItem | None = None) -> bool:
        """Record the outcome of one item; repeated observations of a key are ignored.

        Args:
            key: the item's stable identifier.
            conversions: conversion reasons applied to the item (counted if it was kept).
            skipped: the :class:`SkipItem` that dropped it, or ``None`` if it was kept.

        Returns:
            ``True`` if the item was counted, ``False`` if its key had been observed before.
        """
        if key in self._observed:
            return False
        self._observed.add(key)
        self.seen += 1
        conversions = tuple(conversions)
        if skipped is None:
            self.yielded += 1
            self.converted.update(conversions)
        else:
            self.skipped[skipped.reason] += 1
            self._example(skipped.reason, f"{key}: {skipped.detail}" if skipped.detail else key)
            if len(self.skipped_items) < ITEM_LIST_CAP:
                self.skipped_items.append((key, skipped.reason, skipped.detail))
            else:
                self.skipped_items_omitted += 1
        if self._outbox is not None:
            self._outbox.append(("item", key, conversions, None if skipped is None else skipped.reason,
                                 "" if skipped is None else skipped.detail))
        return True

    def error(self, reason: str, detail: str) -> None:
        """Count a problem that is not tied to one item (e.g. a truncated shard)."""
        self.errors[reason] += 1
        self._example(reason, detail)
        if len(self.error_items) < ITEM_LIST_CAP:
            self.error_items.append((reason, detail))
        else:
            self.error_items_omitted += 1
        if self._outbox is not None:
            self._outbox.append(("error", reason, detail))

    # ------------------------------------------------------------ events (worker -> main process)
    def open_outbox(self) -> None:
        """From now on, also queue every new observation and error as an event for :meth:`drain`."""
        if self._outbox is None:
            self._outbox = []

    def drain(self) -> list[tuple]:
        """The events queued since the last call (an empty list if the outbox is not open)."""
        if not self._outbox:
            return []
        events, self._outbox = self._outbox, []
        return events

    def apply(self, events: Iterable[tuple]) -> list[tuple[str, str, str]]:
        """Replay events drained from another copy of these stats (e.g. a worker's).

        Items are counted once per key, whichever copy saw them first.

        Returns:
            The newly counted skips, as ``(key, reason, detail)``.
        """
        new_skips = []
        for event in events:
            if event[0] == "item":
                _, key, conversions, reason, detail = event
                skipped = None if reason is None else SkipItem(reason, detail)
                if self.observe(key, conversions, skipped) and skipped is not None:
                    new_skips.append((key, reason, detail))
            elif event[0] == "error":
                self.error(event[1], event[2])
            else:
                raise ValueError(f"unknown data event {event!r}")
        return new_skips

    @property
    def skipped_total(self) -> int:
        """Number of distinct items skipped, all reasons together."""
        return sum(self.skipped.values())

    def report(self) -> dict:
        """The counts and the listed items as a JSON-ready dict (what ``data_report.json`` holds)."""
        return {
            "source": self.name,
            "seen": self.seen,
            "usable": self.yielded,
            "skipped": self.skipped_total,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "converted": dict(sorted(self.converted.items())),
            "errors": dict(sorted(self.errors.items())),
            "advice": {r: _SKIP_ADVICE[r] for r in sorted(self.skipped) if r in _SKIP_ADVICE},
            "skipped_items": [{"key": k, "reason": r, "detail": d} for k, r, d in self.skipped_items],
            "skipped_items_not_listed": self.skipped_items_omitted,
            "error_items": [{"reason": r, "detail": d} for r, d in self.error_items],
            "error_items_not_listed": self.error_items_omitted,
        }

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
            advice = skip_advice(self.skipped)
            if advice:
                msg += " To fix: " + "; ".join(advice) + "."
            for reason, texts in sorted(self.examples.items()):
                msg += f" Example {reason}: {texts[0]}."
        if hint:
            msg += " " + hint
        return EmptySourceError(msg)


def _format_counter(counter: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))
