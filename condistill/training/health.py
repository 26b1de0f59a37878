"""Whether a run may continue from a checkpoint: the per-step loss and largest adapter weight it watches.

Every checkpoint records in ``state.json["health"]`` whether a run may continue from it.
Two per-step series are watched: the training loss (every step's, not only the logged ones) and
the largest absolute adapter weight after the step. A checkpoint is healthy when its online and
EMA weights are all finite and, for each series, the mean over the last :data:`HEALTH_WINDOW`
(K) steps is finite and at most :data:`HEALTH_FACTOR` (M) times the median of the means of the
earlier K-step windows (steps ``1..K``, ``K+1..2K``, ...: those that end before the last K steps
begin, the newest :data:`HEALTH_HISTORY`). The weights before the first step are the first
weight window, so a checkpoint whose weights exploded in its very first step is unhealthy; with
no earlier loss window the loss is only checked for finiteness.

Checkpoints written before the health record existed count as healthy. What a run does with the
verdict (where unhealthy checkpoints go, which one ``--resume latest`` picks) is in
:mod:`condistill.training.checkpoint`.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

__all__ = ["HEALTH_WINDOW", "HEALTH_FACTOR", "HEALTH_HISTORY", "RunHealth", "max_abs_weight", "non_finite"]

#: K: the health rule compares the mean loss (and largest |weight|) of the last K steps ...
HEALTH_WINDOW = 10
#: M: ... with M times the median of the earlier K-step windows' means
HEALTH_FACTOR = 10.0
#: how many earlier window means a checkpoint remembers (the median runs over these)
HEALTH_HISTORY = 1000


class _Series:
    """One per-step quantity: its last K values, the open K-step window, the means of closed windows."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.recent: list[tuple[int, float]] = [(int(s), float(v)) for s, v in state.get("recent", [])]
        self.pending: list[float] = [float(v) for v in state.get("pending", [])]
        self.windows: list[tuple[int, float]] = [(int(s), float(v)) for s, v in state.get("windows", [])]

    def add(self, step: int, value: float) -> None:
        self.recent = (self.recent + [(step, float(value))])[-HEALTH_WINDOW:]
        self.pending.append(float(value))
        if step % HEALTH_WINDOW == 0:
            self.windows = (self.windows + [(step, sum(self.pending) / len(self.pending))])[-HEALTH_HISTORY:]
            self.pending = []

    def verdict(self, what: str) -> tuple[bool, str]:
        if not self.recent:
            return True, f"no {what} recorded yet"
        first, last = self.recent[0][0], self.recent[-1][0]
        values = [v for _, v in self.recent]
        mean = sum(values) / len(values)
        where = f"the mean {what} of steps {first}-{last} is {mean:.4g}"
        if not all(math.isfinite(v) for v in values) or not math.isfinite(mean):
            return False, f"{where} (not finite)"
        earlier = [m for end, m in self.windows if end < first and math.isfinite(m)]
        if not earlier or statistics.median(earlier) <= 0:
            return True, f"{where} (finite; nothing earlier to compare with)"
        median = statistics.median(earlier)
        compared = f"{HEALTH_FACTOR:g} x the median {median:.4g} of the {len(earlier)} earlier windows"
        if mean > HEALTH_FACTOR * median:
            return False, f"{where}, above {compared} (it is exploding)"
        return True, f"{where}, within {compared}"

    def state_dict(self) -> dict:
        return {"recent": [list(x) for x in self.recent], "pending": list(self.pending),
                "windows": [list(x) for x in self.windows]}


def max_abs_weight(params: dict[str, torch.Tensor]) -> float:
    """The largest ``|w|`` over the adapter tensors (NaN if any is NaN, inf if any is inf); one sync."""
    norms = [torch.linalg.vector_norm(p.detach(), ord=math.inf).float() for p in params.values() if p.numel()]
    return float(torch.stack(norms).max()) if norms else 0.0


class RunHealth:
    """The per-step losses and largest adapter weights a checkpoint's health verdict reads (module docstring)."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.loss = _Series(state.get("loss"))
        self.weights = _Series(state.get("max_abs_weight"))

    @classmethod
    def start(cls, resume_from: Path | None, params: dict[str, torch.Tensor]) -> "RunHealth":
        """The history of a run that starts from ``resume_from`` (``None``: fresh) with ``params`` loaded."""
        state = json.loads((Path(resume_from) / "state.json").read_text()) if resume_from else {}
        health = cls(state.get("health", {}).get("history"))
        if not (health.weights.windows or health.weights.recent):
            # the weights before the first step (or of a checkpoint without history) are the first reference
            health.weights.windows.append((int(state.get("step", 0)), max_abs_weight(params)))
        return health

    def add(self, step: int, loss: float, max_abs: float | None = None) -> None:
        """Record the loss of (1-based) ``step`` and the largest adapter weight after it."""
        self.loss.add(step, loss)
        if max_abs is not None:
            self.weights.add(step, max_abs)

    def verdict(self) -> tuple[bool, str]:
        """``(healthy, reason)`` of the steps recorded so far."""
        (a, why_a), (b, why_b) = self.loss.verdict("loss"), self.weights.verdict("largest |adapter weight|")
        return a and b, f"{why_a}; {why_b}"

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "max_abs_weight": self.weights.state_dict()}



def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    if not tensors:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all() for t in tensors.values()]).cpu().tolist()
    return [name for name, ok in zip(tensors, flags) if not ok]

