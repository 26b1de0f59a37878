"""Resumable training state, kept apart from the slim adapter export.

A checkpoint folder ``checkpoints/step-XXXXXXX`` holds:

- ``online.safetensors``: the adapter weights the optimizer updates,
- ``ema.safetensors``: the EMA weights used by the target/ODE branches and exported,
- ``training_state.pt``: optimizer, learning-rate schedule, RNG states (tensors and plain
  containers only, read back with ``weights_only=True``),
- ``state.json``: the step, the resolved configuration, the number of processes that trained it
  and its global batch (images per optimizer step, all processes and accumulation together), the
  fingerprint of its data source (:mod:`condistill.data.fingerprint`, compared on resume), and
  the health record.

Health (:mod:`condistill.training.health`). Every checkpoint records in ``state.json["health"]``
whether a run may continue from it. ``--resume latest`` (:func:`resolve_resume`) picks the newest
healthy checkpoint; an unhealthy checkpoint passed by path is refused, naming the last healthy one.
A checkpoint found unhealthy when it is written goes to ``checkpoints/unhealthy/`` instead, and an
unhealthy checkpoint that a resume passes over is moved there: kept and reported, never counted by
pruning, never removed. ``loss.jsonl`` lines that a resume past such checkpoints cuts are kept
beside them (``checkpoints/unhealthy/loss-after-step-XXXXXXX.jsonl``).

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
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from condistill.files import fsync as _fsync
from condistill.files import set_shared_mode, write_text
from condistill.seeding import global_rng_state, set_global_rng_state
from condistill.training.health import HEALTH_FACTOR, HEALTH_WINDOW, RunHealth, max_abs_weight, non_finite

PREFIX = "step-"
TMP = ".tmp-"
TRASH = ".trash-"
CHECKPOINT_FILES = ("online.safetensors", "ema.safetensors", "training_state.pt", "state.json")
#: where unhealthy checkpoints are kept, inside ``checkpoints/``
UNHEALTHY = "unhealthy"

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


def list_unhealthy(output_dir: str | Path) -> list[Path]:
    """The checkpoints kept under ``checkpoints/unhealthy/``, oldest first."""
    return _list(checkpoint_dir(output_dir) / UNHEALTHY)


def _kept_place(root: Path, name: str) -> Path:
    """Where the unhealthy checkpoint ``name`` of the checkpoints folder ``root`` is kept: ``root/unhealthy/name``,
    or a numbered name beside it when that step was already kept once (both are kept)."""
    folder = root / UNHEALTHY
    folder.mkdir(exist_ok=True)
    target = folder / name
    return folder / f"{name}-{len(list(folder.glob(name + '*')))}" if target.exists() else target


def set_aside(path: Path, log: Log | None = None) -> Path:
    """Move the checkpoint ``path`` into ``checkpoints/unhealthy/`` (kept, out of resume's and pruning's way)."""
    target = _kept_place(path.parent, path.name)
    os.rename(path, target)
    _fsync(path.parent)
    (log or _logger.info)(f"kept the unhealthy checkpoint {path.name} as {target} ({checkpoint_health(target)[1]})")
    return target




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
        bad = non_finite(params)
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
    kept = list_unhealthy(output_dir)
    if kept:
        log(f"{len(kept)} unhealthy checkpoint(s) are kept in {kept[0].parent} ({', '.join(p.name for p in kept)}); "
            "--resume latest passes over them")
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
        root = path.parent.parent if path.parent.name == UNHEALTHY else path.parent
        good = _last_healthy_in(root)
        hint = f"the last healthy one is {good}" if good else f"no checkpoint in {root} is healthy"
        raise UnhealthyCheckpointError(f"checkpoint {path} is unhealthy ({reason}); refusing to resume from it: {hint}")
    return path


def _logged_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut by a kill: dropped
        return math.inf


def truncate_log(log_path: Path, step: int, keep_cut: Path | None = None) -> int:
    """Keep the lines of ``loss.jsonl`` with ``step <= step`` (none for 0); return how many were dropped.

    ``keep_cut``: a file the dropped lines are appended to first.
    """
    log_path = Path(log_path)
    if not log_path.exists():
        return 0
    lines = log_path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    cut = [line for line in lines if _logged_step(line) > step]
    if cut and keep_cut is not None:
        keep_cut.parent.mkdir(parents=True, exist_ok=True)
        with keep_cut.open("a") as f:
            f.write("\n".join(cut) + "\n")
    if not kept:
        log_path.unlink()
    elif len(kept) < len(lines):
        write_text(log_path, "\n".join(kept) + "\n")
    return len(lines) - len(kept)


def later_checkpoints(output_dir: str | Path, step: int) -> list[Path]:
    """The healthy checkpoints after ``step``: what resuming from ``step`` would delete."""
    return [p for p in list_checkpoints(output_dir) if _step_of(p) > step and checkpoint_health(p)[0]]


def reset_run_to(output_dir: str | Path, step: int, log_path: Path | None = None, log: Log | None = None) -> None:
    """Make the run folder describe a run at ``step`` (call once at start, on the main process).

    Removes stale ``.tmp-*``/``.trash-*`` folders; moves unhealthy checkpoints into
    ``checkpoints/unhealthy/`` (kept); deletes healthy checkpoints after ``step`` (a history the
    resumed run replaces: :func:`condistill.training.run_folder.check_output_dir` has refused
    this without ``--overwrite``) and cuts ``log_path`` (``loss.jsonl``) back to ``step``. The lines cut
    after an unhealthy checkpoint was set aside are kept beside it.
    """
    log = log or _logger.info
    root = checkpoint_dir(output_dir)
    moved = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith((TMP, TRASH)):
                log(f"removing the stale folder {p} (left by an interrupted save or prune)")
                shutil.rmtree(p, ignore_errors=True)
        moved = [set_aside(p, log) for p in _list(root) if not checkpoint_health(p)[0]]
        later = [p for p in _list(root) if _step_of(p) > step]
        if later:
            log(f"removing checkpoints after step {step} ({', '.join(p.name for p in later)}): the run continues "
                f"from step {step}")
        for p in later:
            _discard(p)
    if log_path is not None:  # the lines of a stretch whose unhealthy checkpoints are kept are kept beside them
        kept_later = moved or any(_step_of(p) > step for p in _list(root / UNHEALTHY))
        keep = root / UNHEALTHY / f"loss-after-step-{step:07d}.jsonl" if kept_later else None
        dropped = truncate_log(log_path, step, keep_cut=keep)
        if dropped and step:
            where = f"; they are kept in {keep}" if keep else ""
            log(f"cut {log_path} back to step {step} ({dropped} later lines removed{where})")


def _discard(path: Path) -> None:
    """Delete a checkpoint folder: first out of the ``step-*`` name space, then its files."""
    trash = path.with_name(TRASH + path.name)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    _fsync(path.parent)
    shutil.rmtree(trash)


def prune(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints and the newest healthy one; return the deleted ones.

    Unhealthy checkpoints (in ``checkpoints/unhealthy/``) are neither counted nor deleted.
    """
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
                    extra: dict | None = None, data: dict | None = None) -> Path:
    """Write a complete checkpoint for ``step`` with its health record; prune (:func:`prune`) to ``keep``.

    ``processes`` is the number of processes that trained it (each with ``config["batch_size"]``);
    ``extra`` maps names to objects with ``state_dict()`` (e.g. the fake score), kept with the optimizer;
    ``data`` is the fingerprint of the run's data source (``state.json["data"]``), compared on resume.

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
    bad = non_finite(online) + [f"ema:{k}" for k in non_finite(ema_weights)]
    if bad:
        healthy, reason = False, f"non-finite adapter weights ({', '.join(bad[:3])}); {reason}"
    global_batch = config.get("batch_size", 0) * processes * config.get("gradient_accumulation_steps", 1)
    state = {"step": step, "config": config, "processes": processes, "global_batch": global_batch, "data": data,
             "health": {
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
        set_shared_mode(tmp)  # 0644 files under umask 022 (safetensors writes 0600)
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
    if not healthy:  # kept for inspection, never resumed from by 'latest', never pruned
        final = _kept_place(root, final.name)
    elif final.exists():
        _discard(final)
    os.rename(tmp, final)
    _fsync(final.parent)
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
