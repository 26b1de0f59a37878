"""Writing files so that a reader sees the old version or the new one, never a mix, and nothing is lost.

- :func:`write_text` / :func:`replace_file`: one file written under a temporary sibling name,
  flushed to disk and renamed over the old one (``os.replace`` is atomic on one filesystem).
- :func:`staged_folder`: a whole folder (an adapter export) written under ``.tmp-<name>-<pid>``
  beside its final place and swapped in by :func:`replace_folder`: the old folder is renamed
  to ``.old-<name>``, the new one to ``<name>``, then the old one is deleted. Between the two
  renames no ``<name>`` exists; a kill exactly there leaves ``.old-<name>`` complete, which
  :func:`previous_folder` finds for readers and :func:`recover_folder` puts back (or deletes,
  when the new folder is in place) at the next write.
- :func:`set_shared_mode`: weight files get the usual ``0644`` under ``umask 022`` (safetensors
  and ``mkstemp`` create them ``0600``, unreadable to others on a shared machine or a served folder).
- :func:`sha256_file`: the content hash recorded with exports and caches.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["TMP_PREFIX", "OLD_PREFIX", "fsync", "writer_alive", "set_shared_mode", "sha256_file", "write_text", "replace_file",
           "staged_folder", "replace_folder", "recover_folder", "previous_folder"]

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_CHUNK = 1 << 20


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entries to the disk (folders cannot be opened for it on Windows)."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_shared_mode(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file and folder below a folder) the modes a plain ``open`` would:
    ``0666`` / ``0777`` minus the umask (``0644`` / ``0755`` under ``umask 022``)."""
    mask, path = _umask(), Path(path)
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in targets:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def replace_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` by calling ``write(tmp)`` on a temporary sibling, then rename it into place.

    The temporary file is removed when ``write`` fails; the old ``path`` is untouched until the rename.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        write(tmp)
        set_shared_mode(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`replace_file`)."""
    return replace_file(path, lambda tmp: tmp.write_text(text))


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
        if p.is_file() or p.is_dir():
            fsync(p)
    fsync(folder)


def writer_alive(pid: str) -> bool:
    """Whether another live process on this machine may still be writing a staging folder of that pid."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def recover_folder(final: str | os.PathLike, log: Callable[[str], None] | None = None) -> None:
    """Clean up after an interrupted :func:`replace_folder` of ``final``.

    ``.tmp-<name>-<pid>`` staging folders of processes no longer running are removed (they were never
    complete); ``.old-<name>`` is
    renamed back when ``final`` is missing (the kill came between the two renames), else deleted.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return
    say = log or (lambda message: None)
    for p in parent.iterdir():
        pid = p.name[len(f"{TMP_PREFIX}{final.name}-"):]
        if p.name.startswith(f"{TMP_PREFIX}{final.name}-") and p.is_dir() and not writer_alive(pid):
            say(f"removing {p}, left by an interrupted write")
            shutil.rmtree(p, ignore_errors=True)
    old = parent / f"{OLD_PREFIX}{final.name}"
    if old.exists():
        if final.exists():
            say(f"removing {old}, the previous export replaced by an interrupted write")
            shutil.rmtree(old, ignore_errors=True)
        else:
            say(f"restoring {final} from {old} (a write was interrupted while swapping it in)")
            os.replace(old, final)
            fsync(parent)


def previous_folder(final: str | os.PathLike) -> Path | None:
    """``.old-<name>`` beside ``final`` when ``final`` is missing: what a reader uses meanwhile."""
    final = Path(final)
    old = final.parent / f"{OLD_PREFIX}{final.name}"
    return old if not final.exists() and old.is_dir() else None


def replace_folder(stage: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the complete folder ``stage`` in the place of ``final`` (see the module docstring)."""
    stage, final = Path(stage), Path(final)
    set_shared_mode(stage)
    _fsync_tree(stage)
    old = final.parent / f"{OLD_PREFIX}{final.name}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def staged_folder(final: str | os.PathLike, log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; when the block ends without an error it replaces
    ``final`` (:func:`replace_folder`), otherwise it is removed and ``final`` is left as it was.

    Leftovers of an earlier interrupted write of ``final`` are cleaned up first (:func:`recover_folder`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(final, log)
    stage = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
        replace_folder(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
