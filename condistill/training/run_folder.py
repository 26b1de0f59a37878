"""The run folder: finished work is never overwritten silently, one run writes a folder at a time,
and a resumed run may change only the options that cannot alter what was already computed.

- :func:`check_output_dir` refuses a file in the way, a folder that holds checkpoints when
  ``--resume`` was not given, and, unless ``--overwrite``, anything that would remove finished
  work: a finished export with no checkpoint to resume, a resume from an older checkpoint than the
  newest healthy one (the later checkpoints and the export they led to would be deleted), and a
  restart from step 0 when every checkpoint is unhealthy. Continuing forward from the newest
  healthy checkpoint needs nothing: its export is replaced, atomically, when the run ends.
- The run's export lives in ``<output_dir>/adapter/`` (:data:`EXPORT_SUBFOLDER`), written whole
  beside it and swapped in (:func:`condistill.files.staged_folder`); runs written before keep
  theirs at the root until they write a new one (:func:`retire_root_export`).
- :func:`run_lock` holds ``<output_dir>/.condistill.lock`` (pid and host of the writer) for the
  whole run; a second run into the same folder fails at once, and a lock left by a process that
  no longer runs on this host is removed with a message.
- :func:`resume_changes` compares the new command's options with the checkpoint's: options in
  :data:`CHANGEABLE_ON_RESUME` apply (and are reported), a ``max_steps`` below the checkpoint's
  step and every other difference are refused with the list of differences.
- The data order and every random draw follow the *global* batch (``batch_size x processes``,
  :mod:`condistill.training.batches`): a resumed run may use another number of processes only
  with the per-process ``batch_size`` that keeps the checkpoint's global batch.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from condistill.adapters.save_load import CONFIG_NAME, EXPORT_SUBFOLDER, export_names
from condistill.files import previous_folder
from condistill.training.checkpoint import (UNHEALTHY, checkpoint_dir, later_checkpoints, list_checkpoints,
                                           list_unhealthy, read_state)

__all__ = ["CHANGEABLE_ON_RESUME", "EXPORT_SUBFOLDER", "LOCK_NAME", "RUN_ENTRIES", "already_finished", "finished_export", "retire_root_export", "ResumeMismatchError", "RunLockedError", "check_output_dir", "check_resume", "resume_changes",
           "run_lock", "set_learning_rate"]

LOCK_NAME = ".condistill.lock"

#: Options a resumed run may change. They steer what happens from the resumed step on, never
#: what the steps before it computed (a slower EMA from step K on is "stop at K, resume with a
#: new --ema-decay"). Everything else (base, data, adapter, condition, batch, seed, grid, loss,
#: precision, optimizer and its settings restored with its state) is refused. A new learning rate applies from the resumed step on,
#: along the same warm-up schedule (the warm-up is not restarted: past it, the new rate is the
#: constant rate).
CHANGEABLE_ON_RESUME = frozenset({
    "max_steps", "learning_rate", "ema_decay", "ema_decay_late", "ema_late_from", "max_grad_norm", "log_every", "checkpoint_every", "keep_checkpoints", "validate_every",
    "num_workers", "threads", "gradient_checkpointing", "allow_tf32", "resume", "output_dir", "overwrite", "max_skip_fraction",
    "recommended_steps", "stochastic_sampling", "validation_images", "validation_prompts", "report_to",
})


class RunLockedError(RuntimeError):
    """Another run is writing the same output folder."""


class ResumeMismatchError(ValueError):
    """The options of a resumed run contradict its checkpoint's."""


def already_finished(out: Path, step: int, max_steps: int, changes: list[str]) -> Path | None:
    """The export of a run that resumes at its end with nothing changed (running the finished command again):
    there is nothing to train or write, and rewriting the export would drop its card's recorded results."""
    export = finished_export(out)
    if step == max_steps and not changes and export is not None and _export_steps(export) == max_steps:
        return export
    return None


def finished_export(out: Path) -> Path | None:
    """The folder of the run's finished export: ``adapter/``, the root (runs written before it moved),
    or the previous export an interrupted swap left as ``.old-adapter``; ``None`` when there is none."""
    for folder in (out / EXPORT_SUBFOLDER, out, previous_folder(out / EXPORT_SUBFOLDER)):
        if folder is not None and (folder / CONFIG_NAME).is_file():
            return folder
    return None


def _export_steps(folder: Path) -> int | None:
    try:
        steps = json.loads((folder / CONFIG_NAME).read_text()).get("extra", {}).get("steps_trained")
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def check_output_dir(out: Path, cfg, resume_from: Path | None) -> None:
    """Refuse an output folder whose use would remove finished work or cannot be a folder (module docstring).

    Raises:
        NotADirectoryError: ``out`` or one of its parents is a file.
        FileExistsError: the run would delete checkpoints, ``loss.jsonl`` lines or an export that
            ``--overwrite`` was not given for; the message says what and how to keep it. Nothing
            has been written at that point.
    """
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise NotADirectoryError(
                    f"--output-dir {out}: {path} is a file, not a folder; choose another --output-dir or move "
                    "the file away (nothing was written)")
            break
    foreign = _foreign_entries(out)
    if foreign and not cfg.overwrite:
        raise FileExistsError(
            f"--output-dir {out} holds files that are not a condistill run ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); a run writes config.json, loss.jsonl, validation/, checkpoints/ "
            "and adapter/ there. Choose a new or empty --output-dir, or pass --overwrite to write into it anyway "
            "(nothing was written)")
    export = finished_export(out)
    found, unhealthy = list_checkpoints(out), list_unhealthy(out)
    if resume_from is not None and not _inside(resume_from, checkpoint_dir(out)) and not cfg.overwrite and (
            found or unhealthy or export is not None or (out / "loss.jsonl").is_file()):
        raise FileExistsError(
            f"--output-dir {out} already holds another run; continuing the checkpoint {resume_from} there would mix "
            "the two runs' checkpoints, log and export. Choose a new or empty --output-dir, or pass --overwrite "
            "(nothing was overwritten)")
    if resume_from is None:
        if found and cfg.resume is None:
            raise FileExistsError(f"{out} already holds a run with checkpoints; pass --resume latest to continue "
                                  f"it or choose another --output-dir (nothing was overwritten)")
        if (found or unhealthy) and not cfg.overwrite:  # none healthy: a restart from step 0
            export_note = f" and replace the export in {export}" if export else ""
            raise FileExistsError(
                f"every checkpoint of {out} is unhealthy ({', '.join(p.name for p in found + unhealthy)}); "
                f"starting again from step 0 would cut {out / 'loss.jsonl'}{export_note}. Pass --overwrite to "
                f"start again (the unhealthy checkpoints are kept in {checkpoint_dir(out) / UNHEALTHY}), or "
                f"choose another --output-dir (nothing was overwritten)")
        if export is not None and not found and not cfg.overwrite:
            raise FileExistsError(
                f"{out} holds a finished adapter export ({export / CONFIG_NAME}) and no checkpoint to resume from; "
                "pass --overwrite to replace it, or choose another --output-dir (nothing was overwritten)")
        return
    step = int(read_state(resume_from)["step"])
    lost = []
    later = later_checkpoints(out, step)
    if later:
        lost.append(f"the later checkpoints {', '.join(p.name for p in later)}")
        if (out / "loss.jsonl").is_file():
            lost.append(f"the lines of {out / 'loss.jsonl'} after step {step}")
    exported = _export_steps(export) if export is not None else None
    if exported is not None and exported > step:
        lost.append(f"the finished export of step {exported} in {export}")
    if lost and not cfg.overwrite:
        raise FileExistsError(
            f"resuming {out} from {resume_from} (step {step}) would delete {'; '.join(lost)}. Pass --overwrite to "
            f"resume from there anyway, or keep them and continue in a new folder: --resume {resume_from} "
            f"--output-dir <new folder> (nothing was overwritten)")


#: what a run writes into its folder besides an export (an export at the root, :func:`export_names`, is a run
#: written before ``adapter/``)
RUN_ENTRIES = frozenset({
    EXPORT_SUBFOLDER, "checkpoints", "logs", "validation", "config.json", "loss.jsonl", "loss.png", "data_report.json",
    LOCK_NAME})


def _inside(path: Path, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except OSError:
        return False


def _run_config(path: Path) -> bool:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"condition", "adapter", "base", "max_steps"} <= set(saved)


def _foreign_entries(out: Path) -> list[str]:
    """The entries of ``out`` that no condistill run wrote (none for a missing or empty folder, or a run's).

    A ``config.json`` that is not a run's configuration counts as foreign (a model folder, say), and so do
    the run's other files when there is no run configuration beside them.
    """
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    ours = RUN_ENTRIES | export_names(out)
    foreign = [n for n in names if n not in ours and not n.startswith((".tmp-", ".old-"))]
    if (out / "config.json").exists() and not _run_config(out / "config.json"):
        foreign.insert(0, "config.json (not a run's configuration)")
    elif not (out / "config.json").exists():
        written = [n for n in names if n in ("loss.jsonl", "loss.png", "data_report.json", "validation")]
        foreign += [f"{n} (with no run configuration beside it)" for n in written]
    return foreign


def retire_root_export(out: Path, log: Callable[[str], None] = lambda message: None) -> None:
    """Remove an export at the run folder's root (written before exports moved to ``adapter/``) once
    ``adapter/`` holds the newer one: its config first, so it stops being an export at once."""
    config_file = out / CONFIG_NAME
    if not config_file.is_file() or not (out / EXPORT_SUBFOLDER / CONFIG_NAME).is_file():
        return
    names = export_names(out) - RUN_ENTRIES - {"", ".", ".."}  # read from its config before the config goes
    config_file.unlink()
    for name in sorted(names):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.is_file():
            target.unlink()
    log(f"the export moved from {out} to {out / EXPORT_SUBFOLDER} (the older one at the run folder's root was removed)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    try:  # a killed process nobody has reaped yet (a container without an init) is a zombie: not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def run_lock(out: Path, log: Callable[[str], None] = lambda message: None) -> Iterator[Path]:
    """Hold ``out/.condistill.lock`` while the block runs; released (deleted) on exit, also on errors.

    Raises:
        RunLockedError: the lock is held by a live process, or by one on another host (whose
            liveness cannot be checked from here): the message says who and how to clear it.
    """
    path = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            pid, host = holder.get("pid"), holder.get("host")
            stale = isinstance(pid, int) and host == me["host"] and not _alive(pid)
            if attempt or not stale:
                who = f"pid {pid} on {host}, since {holder.get('started', '?')}" if pid else "an unreadable lock"
                raise RunLockedError(
                    f"another condistill run ({who}) is writing {out}; wait for it to finish or choose another "
                    f"--output-dir. If no such run exists any more, delete {path}.") from None
            log(f"removing the stale lock {path}: pid {pid} on {host} no longer runs")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        if _holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


def _same_base(a: Any, b: Any) -> bool:
    if a == b:
        return True
    from condistill.hub import resolve_pretrained_dir

    try:  # "data/tiny-teacher" (older runs) and "embedded:tiny-teacher" name one folder
        return resolve_pretrained_dir(a).resolve() == resolve_pretrained_dir(b).resolve()
    except (OSError, ValueError):
        return False


def _same_when_resolved(key: str, old: Any, value: Any, saved: dict[str, Any], new: dict[str, Any]) -> bool:
    """Options whose "automatic" value (0) and the value it stands for are the same setting."""
    if key == "resolution":
        from condistill.config import check_resolution

        try:
            return check_resolution(saved.get("base", new["base"]), old) == check_resolution(new["base"], value)
        except (OSError, ValueError):
            return False
    if key == "data" and isinstance(old, str) and isinstance(value, str) and Path(old).exists():
        try:  # one folder or file, written relative or absolute, or through a link
            return Path(old).resolve() == Path(value).resolve()
        except OSError:
            return False
    if key == "dmd_fake_lr":  # 0 = the learning rate
        return (old or saved.get("learning_rate")) == (value or new.get("learning_rate"))
    return False


def resume_changes(saved: dict[str, Any], cfg, step: int, processes: int = 1, saved_processes: int = 1) -> list[str]:
    """The options of ``cfg`` that differ from the checkpoint's ``saved`` config, as ``"name: old -> new"``.

    An option the checkpoint's config lacks (written before the option existed) had its default then, and is
    compared as that default; an option this version lacks is not compared.
    ``processes`` is this run's number of processes and ``saved_processes`` the checkpoint's: a
    ``batch_size`` that changes with them so that ``batch_size x processes`` (the global batch) stays
    the same is a change, not a mismatch.

    Raises:
        ResumeMismatchError: ``cfg.max_steps`` is below the checkpoint's ``step``, the global batch
            differs, or an option outside :data:`CHANGEABLE_ON_RESUME` differs; the message lists
            every such difference and says what to pass.
    """
    new = cfg.to_dict()
    saved = {**{key: value for key, value in type(cfg)().to_dict().items() if key in new}, **saved}
    changed, refused = [], []
    old_batch = saved.get("batch_size", cfg.batch_size)
    old_global, new_global = old_batch * saved_processes, cfg.batch_size * processes
    for key in sorted(set(saved) & set(new) - {"resume"}):  # resuming is what this run does
        old, value = saved[key], new[key]
        if json.dumps(old, sort_keys=True) == json.dumps(value, sort_keys=True):
            continue
        if key == "base" and _same_base(old, value):
            continue
        if _same_when_resolved(key, old, value, saved, new):
            continue
        if key == "batch_size" and processes != saved_processes:
            if old_global == new_global:
                changed.append(f"batch_size: {old!r} -> {value!r} per process ({saved_processes} -> {processes} "
                               f"processes, the same global batch of {new_global})")
            continue  # else reported with the process counts below
        (changed if key in CHANGEABLE_ON_RESUME else refused).append(f"{key}: {old!r} -> {value!r}")
    problems = []
    if cfg.max_steps < step:
        problems.append(f"max_steps={cfg.max_steps} is below the checkpoint's step {step}; a finished or longer "
                        f"run cannot be shortened (pass --max-steps {step} or more)")
    if old_global != new_global and processes != saved_processes:
        fits = f"--batch-size {old_global // processes} on {processes} process(es), or " if old_global % processes == 0 else ""
        problems.append(
            f"the checkpoint was trained on {saved_processes} process(es) x batch {old_batch} = a global batch of "
            f"{old_global} per micro-step, this run has {processes} x {cfg.batch_size} = {new_global}; the data "
            f"order and every random draw follow the global batch, so resume with {fits}--batch-size {old_batch} "
            f"on {saved_processes} process(es) (torchrun --nproc_per_node {saved_processes} / accelerate launch "
            f"--num_processes {saved_processes})")
    if refused:
        problems.append("these options differ from the checkpoint's and cannot change in a resumed run (they would "
                        "change what the first steps computed): " + "; ".join(refused))
    if problems:
        raise ResumeMismatchError(f"cannot resume from the checkpoint at step {step}: " + "; ".join(problems)
                         + ". Pass the checkpoint's values, or start a new --output-dir.")
    return changed


def check_resume(checkpoint: Path, cfg, processes: int = 1, data: dict[str, Any] | None = None,
                 log: Callable[[str], None] = lambda message: None) -> list[str]:
    """:func:`resume_changes` against the config and process count saved in ``checkpoint/state.json``, and
    ``data`` (:func:`condistill.data.fingerprint.source_fingerprint` of this run's data) against the
    fingerprint the checkpoint recorded.

    Called before any model loads. A checkpoint without a process count was written by one process;
    one without a data fingerprint (written before it was recorded) is not compared. A source that
    cannot be looked at now or could not then (a hub dataset offline) is said by ``log``, not refused.

    Raises:
        ResumeMismatchError: also when the data changed since the checkpoint (the data order of the
            remaining steps and every random draw would differ from the run it continues).
    """
    from condistill.data.fingerprint import fingerprint_difference, unavailable

    state = json.loads((checkpoint / "state.json").read_text())
    step = int(state["step"])
    changes = resume_changes(state.get("config", {}), cfg, step, processes=processes,
                             saved_processes=int(state.get("processes", 1)))
    saved = state.get("data")
    if data is not None and saved is not None:
        difference = fingerprint_difference(saved, data)
        if difference and (unavailable(saved) or unavailable(data)):
            log(f"the data could not be checked against the checkpoint's: {difference}")
        elif difference:
            raise ResumeMismatchError(
                f"cannot resume from the checkpoint at step {step}: the data changed since it was written ({difference}). "
                "The remaining steps would read another data order; resume with the data as it was, or start a new "
                "--output-dir")
    return changes


def set_learning_rate(optimizer, lr_scheduler, learning_rate: float) -> None:
    """Make ``learning_rate`` the peak rate of a resumed schedule, from its current step on.

    A restored ``LambdaLR`` keeps the checkpoint's base rates; this replaces them and sets each
    parameter group's current rate to ``learning_rate * factor(step)``.
    """
    factor = [group["lr"] / base if base else 0.0 for group, base in zip(optimizer.param_groups, lr_scheduler.base_lrs)]
    lr_scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]
    for group, f in zip(optimizer.param_groups, factor):
        group["lr"] = learning_rate * f
        group["initial_lr"] = learning_rate
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
