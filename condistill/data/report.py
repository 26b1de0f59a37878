"""No silent skips: what a training run says, writes and does about unusable data items.

:class:`SkipMonitor` watches the :class:`~condistill.data.skips.SourceStats` of the data a run
reads:

* a line as skips happen, rate-limited: one line for each of the first ``first_lines`` (5)
  skipped items, then one line each time the number of skips reaches a power of two (8, 16,
  32, ...), so a run with a million bad files prints about twenty lines;
* a summary at the end (counts per reason, an example each, what to do);
* ``data_report.json`` in the run folder, at the end and when the run stops: the source, items
  seen, usable and skipped, counts per reason and of conversions, and every skipped item with
  its key, reason and detail (up to :data:`~condistill.data.skips.ITEM_LIST_CAP`, then how many
  more there were);
* a stop: once at least ``min_seen`` (20) items were seen (or all of them, for a smaller
  source), a skipped fraction above ``max_skip_fraction`` writes the report and raises
  :class:`~condistill.data.skips.TooManySkipsError`.

Messages go through the ``logging`` module, logger ``condistill.data.report``: skip lines and
a summary with skips at WARNING (shown on stderr even when nothing configured logging), the
summary of a clean run at INFO. Pass ``log`` (a callable taking one string) to receive every
message through it instead.

Worker processes: :meth:`SkipMonitor.for_dataset` makes the dataset queue its observations,
``ConditionDataset.collate`` (the loader's ``collate_fn``) puts those made while building a
batch into the batch, in the worker that built it, and :meth:`SkipMonitor.update` counts them in
the main process, once per key. The counts are the same for any ``num_workers``; only the
moment a skip is reported can move by the few batches the workers prefetch. Under a
multi-process launch each process watches the batches it reads; only the process given a
``report_path`` writes the report.

The counts cover what this process read since the run (or its resumption) began: an item the
batches have not reached yet is not counted.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from condistill.data.dataset import DATA_EVENTS_KEY
from condistill.data.skips import SourceStats, TooManySkipsError, skip_advice

__all__ = ["FIRST_LINES", "MIN_SEEN", "REPORT_NAME", "SkipMonitor", "write_report"]

logger = logging.getLogger(__name__)

#: The report's file name in the run folder.
REPORT_NAME = "data_report.json"
#: Items to see before ``max_skip_fraction`` can stop a run (one bad file among the first few does not).
MIN_SEEN = 20
#: Skips reported one line each before the lines thin out to powers of two.
FIRST_LINES = 5


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON to ``path`` (through a temporary file, so a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


class SkipMonitor:
    """Counts a run's data items as its batches arrive; reports skips and stops on too many.

    Args:
        stats: the source's stats as they are now (copied; later observations arrive as events
            through :meth:`update`). ``None`` for a source without stats.
        total: number of candidate items, if known (lowers ``min_seen`` for a smaller source).
        max_skip_fraction: stop when more than this fraction of the items seen were skipped
            (1 never stops).
        report_path: where :meth:`write_report` writes; ``None`` writes nothing.
        min_seen: items to see before the fraction is checked.
        first_lines: skips reported one line each before the power-of-two lines.
        log: callable receiving every message; ``None`` uses the ``logging`` module (see the
            module docstring).
    """

    def __init__(
        self,
        stats: SourceStats | None = None,
        *,
        total: int | None = None,
        max_skip_fraction: float = 0.1,
        report_path: str | os.PathLike | None = None,
        min_seen: int = MIN_SEEN,
        first_lines: int = FIRST_LINES,
        log: Callable[[str], Any] | None = None,
    ):
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
        self.stats = copy.deepcopy(stats) if stats is not None else SourceStats()
        self.stats._outbox = None  # the copy only receives events, it queues none
        self.total = total
        self.max_skip_fraction = float(max_skip_fraction)
        self.report_path = Path(report_path) if report_path is not None else None
        self.min_seen = min_seen
        self.first_lines = first_lines
        self.stopped = False
        self._warn = log or logger.warning
        self._info = log or logger.info
        self._announce(self.stats.skipped_items)  # skips made before (a stream source read at once)

    @classmethod
    def for_dataset(cls, dataset, max_skip_fraction: float = 0.1, report_path: str | os.PathLike | None = None,
                    **kwargs: Any) -> "SkipMonitor":
        """A monitor of ``dataset`` (a ``ConditionDataset``, ``StreamingConditionDataset`` or
        ``CachedDataset``), which it makes queue its events.

        Call it before the loader starts its workers. A sized dataset's ``len(dataset)`` lowers
        ``min_seen`` for a small data set (a ``ConditionDataset`` over a stream-only source reads it
        here); a streaming dataset has no length. The fraction is checked at once.

        Raises:
            TooManySkipsError: the source already shows too many skips.
        """
        total = len(dataset) if hasattr(dataset, "__len__") else None
        monitor = cls(dataset.stats, total=total, max_skip_fraction=max_skip_fraction, report_path=report_path,
                      **kwargs)
        dataset.track_events()
        monitor.check()
        return monitor

    # ------------------------------------------------------------------ counting
    def update(self, batch: Any) -> Any:
        """Count the data events of ``batch`` (removing them from it) and return the batch.

        Raises:
            TooManySkipsError: the skipped fraction is now above ``max_skip_fraction`` (the report
                is written first).
        """
        events = batch.pop(DATA_EVENTS_KEY, None) if isinstance(batch, dict) else None
        if events:
            for event in events:  # one at a time, so each line gives the counts at that skip
                self._announce(self.stats.apply([event]))
            self.check()
        return batch

    @property
    def skip_fraction(self) -> float:
        """Skipped items over items seen (0 before any item is seen)."""
        return self.stats.skipped_total / self.stats.seen if self.stats.seen else 0.0

    def check(self) -> None:
        """Raise :class:`TooManySkipsError` (after writing the report) if too many items were skipped."""
        needed = max(1, min(self.min_seen, self.total) if self.total else self.min_seen)
        if self.stats.seen < needed or self.skip_fraction <= self.max_skip_fraction:
            return
        self.stopped = True
        path = self.write_report()
        raise TooManySkipsError(self._stop_message(path))

    def _announce(self, new_skips: list[tuple[str, str, str]]) -> None:
        first = self.stats.skipped_total - len(new_skips) + 1
        for n, (key, reason, detail) in enumerate(new_skips, first):
            what = f"{key} ({reason}: {detail})" if detail else f"{key} ({reason})"
            if n <= self.first_lines:
                line = f"{self.stats.name}: skipped data item {what}; {n} of {self.stats.seen} items seen skipped"
                if n == self.first_lines:
                    line += "; further skips are reported at 8, 16, 32, ... skips and at the end"
                self._warn(line)
            elif n & (n - 1) == 0:
                self._warn(f"{self.stats.name}: {n} data items skipped so far of {self.stats.seen} seen "
                           f"({_counts(self.stats.skipped)}); latest: {what}")

    # ------------------------------------------------------------------ reporting
    def report(self) -> dict[str, Any]:
        """What ``data_report.json`` holds: :meth:`SourceStats.report` plus the run's threshold."""
        report = self.stats.report()
        head = {k: report.pop(k) for k in ("source", "seen", "usable", "skipped")}
        return {**head, "skip_fraction": self.skip_fraction, "max_skip_fraction": self.max_skip_fraction,
                "stopped": self.stopped, **report}

    def write_report(self) -> Path | None:
        """Write ``data_report.json`` to ``report_path`` (nothing if it is ``None``); return the path."""
        if self.report_path is None:
            return None
        return write_report(self.report_path, self.report())

    def summary(self) -> str:
        """The end-of-run summary: counts per reason, an example each, the advice, where the list is."""
        s = self.stats
        where = f" (see {self.report_path})" if self.report_path is not None else ""
        if not s.skipped and not s.errors:
            text = f"{s.name}: {s.yielded} of {s.seen} data items used, none skipped{where}"
            return text + (f"; converted: {_counts(s.converted)}" if s.converted else "")
        text = s.summary()
        advice = skip_advice(sorted(s.skipped))
        if advice:
            text += "\n  to fix: " + "; ".join(advice)
        if s.skipped and self.report_path is not None:
            text += f"\n  every skipped item is listed in {self.report_path}"
        return text

    def finish(self) -> Path | None:
        """End of the run: write the report, log the summary; return the report's path."""
        path = self.write_report()
        (self._warn if self.stats.skipped or self.stats.errors else self._info)(self.summary())
        return path

    def _stop_message(self, path: Path | None) -> str:
        s = self.stats
        top = []
        for reason, count in s.skipped.most_common(3):
            example = (s.examples.get(reason) or [""])[0]
            top.append(f"{reason}={count}" + (f" (e.g. {example})" if example else ""))
        listed = f"Every skipped item is listed in {path}. " if path is not None else ""
        advice = skip_advice(r for r, _ in s.skipped.most_common())
        return (
            f"{s.name}: {s.skipped_total} of the {s.seen} data items seen so far were unusable "
            f"({self.skip_fraction:.1%}), more than max_skip_fraction={self.max_skip_fraction:g}; the run stopped. "
            f"Top reasons: {', '.join(top)}. {listed}"
            f"Fix or remove those files{' (' + '; '.join(advice) + ')' if advice else ''}, or raise "
            "--max-skip-fraction (1 never stops). Checkpoints already written are kept "
            "(after the fix, continue with --resume latest)."
        )


def _counts(counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))
