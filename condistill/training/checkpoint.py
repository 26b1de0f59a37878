"""Resumable training state, kept apart from the slim adapter export.

A checkpoint folder ``checkpoints/step-XXXXXXX`` holds:

- ``online.safetensors``: the adapter weights the optimizer updates,
- ``ema.safetensors``: the EMA weights used by the target/ODE branches and exported,
- ``training_state.pt``: optimizer, learning-rate schedule, RNG states (tensors and plain
  containers only, read back with ``weights_only=True``),
- ``state.json``: the step, the resolved configuration, the number of processes that trained it
  and its global batch (images per optimizer step, all processes and accumulation together), and
  the health record.

Health. Every checkpoint records in ``state.json["health"]`` whether a run may continue from it.
Two per-step series are watched: the training loss (every step's, not only the logged ones) and
the largest absolute adapter weight after the step. A checkpoint is healthy when its online and
EMA weights are all finite and, for each series, the mean over the last :data:`HEALTH_WINDOW`
(K) steps is finite and at most :data:`HEALTH_FACTOR` (M) times the median of the means of the
earlier K-step windows (steps ``1..K``, ``K+1..2K``, ...: those that end before the last K steps
begin, the newest :data:`HEALTH_HISTORY`). The weights before the first step are the first
weight window, so a checkpoint whose weights exploded in its very first step is unhealthy; with
no earlier loss window the loss is only checked for finiteness.

Checkpoints written before the health record existed count as healthy. ``--resume latest``
(:func:`resolve_resume`) picks the newest healthy checkpoint and says which (and which unhealthy
ones it skipped); an unhealthy checkpoint passed by path is refused, naming the last healthy one.
Pruning always keeps the newest healthy checkpoint, even beyond ``keep``.

Disk safety. A checkpoint is written under ``.tmp-step-*``; every file and the folder are fsynced
before the folder is renamed to ``step-*``, and the parent folder after. A checkpoint leaves the
``step-*`` name space (renamed to ``.trash-step-*``) before it is deleted, so a kill during pruning
never leaves a listed checkpoint without its weights; only folders holding all of
:data:`CHECKPOINT_FILES` are listed. Stale ``.tmp-*``/``.trash-*`` folders are removed when a run
starts (:func:`reset_run_to`). A full disk during a write raises ``OSError(ENOSPC)`` naming the
folder and the space needed, after removing the partial folder; earlier checkpoints are untouched.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from condistill.seeding import global_rng_state, set_global_rng_state

PREFIX = "step-"
TMP = ".tmp-"
TRASH = ".trash-"
CHECKPOINT_FILES = ("online.safetensors", "ema.safetensors", "training_state.pt", "state.json")
#: K: the health rule compares the mean loss (and largest |weight|) of the last K steps ...
HEALTH_WINDOW = 10
#: M: ... with M times the median of the earlier K-step windows' means
HEALTH_FACTOR = 10.0
#: how many earlier window means a checkpoint remembers (the median runs over these)
HEALTH_HISTORY = 1000

_logger = logging.getLogger(__name__)
Log = Callable[[str], None]


class UnhealthyCheckpointError(ValueError):
    """A checkpoint passed by path whose health record says it must not be resumed."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def _list(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and all((p / name).is_file() for name in CHECKPOINT_FILES)]
    return sorted(found, key=_step_of)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (every file of :data:`CHECKPOINT_FILES`), oldest first."""
    return _list(checkpoint_dir(output_dir))


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
        state = read_state(resume_from) if resume_from else {}
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


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    if not tensors:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all() for t in tensors.values()]).cpu().tolist()
    return [name for name, ok in zip(tensors, flags) if not ok]


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def checkpoint_health(path: Path) -> tuple[bool, str]:
    """``(healthy, reason)`` from a checkpoint's ``state.json`` (no record: written before it existed, healthy)."""
    try:
        state = read_state(path)
    except (OSError, ValueError) as err:
        return False, f"unreadable state.json ({err})"
    health = state.get("health")
    if health is None:
        return True, "written before health records (counted as healthy)"
    return bool(health.get("healthy")), str(health.get("reason", ""))


def _last_healthy_in(root: Path) -> Path | None:
    return next((p for p in reversed(_list(root)) if checkpoint_health(p)[0]), None)


def last_healthy(output_dir: str | Path) -> Path | None:
    """The newest healthy complete checkpoint of a run, or ``None``."""
    return _last_healthy_in(checkpoint_dir(output_dir))


def divergence_error(output_dir: str | Path, step: int, what: str, learning_rate: float,
                     mixed_precision: str = "no") -> FloatingPointError:
    """The error that stops a diverged run: the step, what broke, the last healthy checkpoint, what to change."""
    good = last_healthy(output_dir)
    where = (f"the last healthy checkpoint is {good} (step {_step_of(good)}); continue from it with --resume latest "
             f"and a lower --learning-rate (now {learning_rate:g}, try {learning_rate / 10:g})" if good else
             f"there is no healthy checkpoint yet; start again with a lower --learning-rate (now {learning_rate:g}, "
             f"try {learning_rate / 10:g})")
    precision = f", or start again with --mixed-precision no (now {mixed_precision})" if mixed_precision != "no" else ""
    return FloatingPointError(f"training diverged at step {step}: {what}. No checkpoint was written from the "
                              f"diverged weights; {where}{precision}.")


def check_step(output_dir, step: int, loss: float, params: dict[str, torch.Tensor], learning_rate: float,
               mixed_precision: str = "no") -> float:
    """Raise :func:`divergence_error` if ``step``'s loss or the adapter weights after it are not finite.

    Returns the largest absolute adapter weight (for :meth:`RunHealth.add`).
    """
    if not math.isfinite(loss):
        raise divergence_error(output_dir, step, f"the loss became {loss}", learning_rate, mixed_precision)
    largest = max_abs_weight(params)
    if not math.isfinite(largest):
        bad = _non_finite(params)
        raise divergence_error(output_dir, step, f"the adapter weights became non-finite after the optimizer step "
                               f"(NaN/inf gradients or an overflowing update; e.g. {', '.join(bad[:3])})",
                               learning_rate, mixed_precision)
    return largest


def guarded_step(optimizer, output_dir, step: int, learning_rate: float, mixed_precision: str = "no") -> None:
    """``optimizer.step()``; an overflow inside it (``RuntimeError ... overflow``) becomes :func:`divergence_error`."""
    try:
        optimizer.step()
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        raise divergence_error(output_dir, step, f"the optimizer step overflowed ({err})", learning_rate,
                               mixed_precision) from err


def resolve_resume(output_dir: str | Path, resume: str | None, log: Log | None = None) -> Path | None:
    """Turn ``--resume`` into a checkpoint folder (``None`` = start fresh).

    ``latest`` is the newest healthy checkpoint (``log`` says which, and which unhealthy ones it
    skipped); with none yet the run starts fresh, so "run the same command again" works for the
    first run and for every run after it. A path must be a complete, healthy checkpoint.

    Raises:
        FileNotFoundError: a path that is not a (complete) checkpoint.
        UnhealthyCheckpointError: a path whose health record says it diverged.
    """
    log = log or _logger.info
    if resume is None:
        return None
    if resume == "latest":
        skipped = []
        for path in reversed(list_checkpoints(output_dir)):
            healthy, reason = checkpoint_health(path)
            if healthy:
                note = "; skipped the newer unhealthy " + "; ".join(skipped) if skipped else ""
                log(f"resuming from {path}, the newest healthy checkpoint{note}")
                return path
            skipped.append(f"{path.name} ({reason})")
        if skipped:
            log(f"no healthy checkpoint in {checkpoint_dir(output_dir)} (unhealthy: {'; '.join(skipped)}); "
                f"starting from step 0")
        return None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a condistill checkpoint (no state.json); pass 'latest' or a "
                                f"folder under {checkpoint_dir(output_dir)}")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); pass 'latest' "
                                f"or another folder under {checkpoint_dir(output_dir)}")
    healthy, reason = checkpoint_health(path)
    if not healthy:
        good = _last_healthy_in(path.parent)
        hint = f"the last healthy one is {good}" if good else f"no checkpoint in {path.parent} is healthy"
        raise UnhealthyCheckpointError(f"checkpoint {path} is unhealthy ({reason}); refusing to resume from it: {hint}")
    return path


def _logged_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut by a kill: dropped
        return math.inf


def truncate_log(log_path: Path, step: int) -> int:
    """Keep the lines of ``loss.jsonl`` with ``step <= step`` (none for 0); return how many were dropped."""
    log_path = Path(log_path)
    if not log_path.exists():
        return 0
    lines = log_path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if not kept:
        log_path.unlink()
    elif len(kept) < len(lines):
        tmp = log_path.with_name(log_path.name + ".tmp")
        tmp.write_text("\n".join(kept) + "\n")
        _fsync(tmp)
        os.replace(tmp, log_path)
        _fsync(log_path.parent)
    return len(lines) - len(kept)


def reset_run_to(output_dir: str | Path, step: int, log_path: Path | None = None, log: Log | None = None) -> None:
    """Make the run folder describe a run at ``step`` (call once at start, on the main process).

    Removes stale ``.tmp-*``/``.trash-*`` folders, moves away checkpoints after ``step`` (a
    history the resumed run replaces) and cuts ``log_path`` (``loss.jsonl``) back to ``step``.
    """
    log = log or _logger.info
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith((TMP, TRASH)):
                log(f"removing the stale folder {p} (left by an interrupted save or prune)")
                shutil.rmtree(p, ignore_errors=True)
        later = [p for p in _list(root) if _step_of(p) > step]
        if later:
            log(f"removing checkpoints after step {step} ({', '.join(p.name for p in later)}): the run continues "
                f"from step {step}")
        for p in later:
            _discard(p)
    if log_path is not None:
        dropped = truncate_log(log_path, step)
        if dropped and step:
            log(f"cut {log_path} back to step {step} ({dropped} later lines removed)")


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (folders cannot be opened for it on Windows)."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder: first out of the ``step-*`` name space, then its files."""
    trash = path.with_name(TRASH + path.name)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    _fsync(path.parent)
    shutil.rmtree(trash)


def prune(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints and the newest healthy one; return the deleted ones."""
    found = list_checkpoints(output_dir)
    kept = set(found[-keep:])
    good = last_healthy(output_dir)
    if good is not None:
        kept.add(good)
    gone = [p for p in found if p not in kept]
    for p in gone:
        _discard(p)
    return gone


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MB"


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(_nbytes(v) for v in items)


def _disk_full(err: BaseException, root: Path, needed: int) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    # torch.save reports a full disk as "RuntimeError: basic_ios::clear" or "file write failed", safetensors
    # as a SafetensorError: a write error with less room left than the checkpoint needs is a full disk
    try:
        return isinstance(err, (OSError, RuntimeError, SafetensorError)) and shutil.disk_usage(root).free < needed
    except OSError:
        return False


def save_checkpoint(output_dir, step: int, params: dict[str, torch.Tensor], ema, optimizer, lr_scheduler,
                    config: dict, keep: int = 2, health: RunHealth | None = None, processes: int = 1,
                    extra: dict | None = None) -> Path:
    """Write a complete checkpoint for ``step`` with its health record; prune (:func:`prune`) to ``keep``.

    ``processes`` is the number of processes that trained it (each with ``config["batch_size"]``);
    ``extra`` maps names to objects with ``state_dict()`` (e.g. the fake score), kept with the optimizer.

    Raises:
        OSError: ``errno.ENOSPC`` when the disk is full, naming the folder and the space needed;
            the partial folder is removed and earlier checkpoints are left as they were.
    """
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f"{TMP}{PREFIX}{step:07d}"
    online = {k: v.detach().float().contiguous().cpu() for k, v in params.items()}
    ema_weights = {k: v.float().contiguous().cpu() for k, v in ema.state_dict().items()}
    training = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "rng": global_rng_state(),
                "extra": {name: obj.state_dict() for name, obj in (extra or {}).items()}}
    health = health or RunHealth()
    healthy, reason = health.verdict()
    bad = _non_finite(online) + [f"ema:{k}" for k in _non_finite(ema_weights)]
    if bad:
        healthy, reason = False, f"non-finite adapter weights ({', '.join(bad[:3])}); {reason}"
    global_batch = config.get("batch_size", 0) * processes * config.get("gradient_accumulation_steps", 1)
    state = {"step": step, "config": config, "processes": processes, "global_batch": global_batch, "health": {
        "healthy": healthy, "reason": reason, "rule": f"K={HEALTH_WINDOW}, M={HEALTH_FACTOR:g}",
        "history": health.state_dict()}}
    needed = _nbytes(online) + _nbytes(ema_weights) + _nbytes(training)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file(online, str(tmp / "online.safetensors"))
        save_file(ema_weights, str(tmp / "ema.safetensors"))
        torch.save(training, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        for name in CHECKPOINT_FILES:
            _fsync(tmp / name)
        _fsync(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err, root, needed):
            try:
                free = f"{_mb(shutil.disk_usage(root).free)} are free"
            except OSError:
                free = "the free space is unknown"
            kept = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none yet"
            raise OSError(errno.ENOSPC, f"disk full while writing the checkpoint of step {step} into {root}: it needs "
                          f"about {_mb(needed)} (the tensors being written) and {free}. The partial folder was "
                          f"removed and the earlier checkpoints ({kept}) are intact; free some space (or lower "
                          f"--keep-checkpoints) and continue with --resume latest") from err
        raise
    if final.exists():
        _discard(final)
    os.rename(tmp, final)
    _fsync(root)
    prune(output_dir, keep)
    return final


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], ema, optimizer, lr_scheduler,
                    extra: dict | None = None) -> int:
    """Restore online and EMA weights, optimizer, schedule, RNG and the ``extra`` objects; return the step."""
    online = load_file(str(path / "online.safetensors"))
    missing, unexpected = set(params) - set(online), set(online) - set(params)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match this adapter: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}; was it written with another --adapter or base?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(online[name].to(device=p.device, dtype=p.dtype))
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    state = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name, obj in (extra or {}).items():
        if name not in state.get("extra", {}):
            raise RuntimeError(f"checkpoint {path} holds no {name} state; it was written by a run without it")
        obj.load_state_dict(state["extra"][name])
    set_global_rng_state(state["rng"])
    return int(read_state(path)["step"])
