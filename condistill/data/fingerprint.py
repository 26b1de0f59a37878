"""What a training data source was when it was read: a cheap fingerprint, and what changed since.

:func:`source_fingerprint` describes a ``--data`` spec without reading its data; a latent cache
records it when it is built (and names a change when it is opened for training), a run can record
it in its checkpoints. :func:`fingerprint_difference` says in one line what differs between two.

What is recorded, by kind of spec (the fingerprint's ``kind``):

* ``files`` (image folders, ``save_to_disk`` and data folders, data files, tar shards): every
  non-hidden file's path relative to ``root``, its size and its modification time (ns). Not the
  files' hashes: hashing reads the whole source, hundreds of GB for a million images, which would
  cost every cache build and every run start as much I/O as the cache build itself; a listing is
  one ``stat`` per file. What it cannot see is a file rewritten at the same size with its old
  modification time put back. Up to :data:`LISTED_FILES` files are listed by name, so a difference
  names them; a bigger source keeps the record small (a few KB, fit for a checkpoint) as
  :data:`GROUPS` groups of names (by a hash of the name), each with its file count and a digest of
  its entries: a difference then gives the counts and how many groups differ.
* ``hub`` (a Hugging Face dataset id): the commit the revision resolves to and the repository's
  files with their sizes, as the hub reports them (no download). When the hub cannot be reached
  (offline, ``HF_HUB_OFFLINE=1``), ``unavailable`` says why.
* ``spec`` (``synthetic:...`` and other registered prefixes): the spec itself; the synthetic world
  is generated from the spec and options, so the same spec is the same data.
* ``cache`` (a latent cache folder): the SHA-256 of its ``index.json`` (which holds every shard's) without
  the build time and the source record: a rebuild of the same content is the same data.
* ``missing``: a path that does not exist (``unavailable`` says so).

Every fingerprint also holds ``spec`` (a path made absolute, so it means the same from another
working directory) and ``options`` (the data options: they choose the split, columns, crops).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from condistill.data.cache_index import INDEX_NAME, is_cache
from condistill.data.sources import classify_folder, is_hub_id, is_prefix_spec, split_subfolder
from condistill.data.webdataset import expand_braces, is_tar_name, tars_under
from condistill.files import sha256_file

__all__ = ["GROUPS", "LISTED_FILES", "fingerprint_difference", "source_fingerprint", "unavailable"]

#: files (or hub files) listed by name; a bigger source is recorded in groups
LISTED_FILES = 4096
#: groups of names a bigger source is recorded in
GROUPS = 256
_HUB_TIMEOUT_S = 10.0
_NAMED = 3  # names shown per kind of change


def source_fingerprint(spec: str | os.PathLike | list, data_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able description of the data ``spec`` (as ``open_source`` takes it) names, without reading its data.

    Args:
        spec: the ``--data`` text (or a list of tar shard paths).
        data_options: the data options the source is opened with (recorded, and compared).

    Returns:
        A dict with ``kind``, ``spec``, ``options`` and what the kind records (module docstring);
        ``unavailable`` holds a one-line reason when the source could not be looked at.
    """
    options = json.loads(json.dumps(dict(data_options or {}), default=str))
    if isinstance(spec, (list, tuple)):
        paths = [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in spec]
        return _files({"kind": "files", "spec": paths, "options": options}, _shard_files(paths), _common_folder(paths))
    text = os.fspath(spec).strip()
    if is_prefix_spec(text):
        return {"kind": "spec", "spec": text, "options": options}
    local = os.path.abspath(os.path.expanduser(text))
    record: dict[str, Any] = {"kind": "files", "spec": local, "options": options}
    path = Path(local)
    try:
        if path.is_dir():
            if is_cache(path):
                return {**record, "kind": "cache", "content_sha256": _cache_content(path / INDEX_NAME)}
            if classify_folder(path) == "images":
                path = split_subfolder(path, str(options.get("split", "train")))
            return _files(record, _walk(path), path)
        if path.is_file():
            return _files(record, [path], path.parent)
    except (OSError, ValueError) as error:  # unreadable, or no longer the layout it had
        return {**record, "unavailable": f"{local} could not be listed: {error}"}
    if any(is_tar_name(p) for p in expand_braces(text)) or glob.has_magic(text):
        return _files(record, _shard_files([local]), _common_folder([local]))
    if is_hub_id(text):
        return _hub({"kind": "hub", "spec": text, "options": options})
    return {"kind": "missing", "spec": local, "options": options, "unavailable": f"{local} does not exist"}


#: index keys that say how or from what a cache was built, not what it holds (a rebuild of the same content
#: differs in them: the build time, the source's modification times)
_CACHE_VOLATILE = ("seconds", "source")


def _cache_content(index: Path) -> str:
    """The SHA-256 of a cache's index without :data:`_CACHE_VOLATILE`: its shards' hashes and the settings."""
    try:
        record = json.loads(index.read_text())
    except (OSError, ValueError):
        return sha256_file(index) if index.is_file() else "unreadable"
    content = {k: v for k, v in record.items() if k not in _CACHE_VOLATILE} if isinstance(record, dict) else record
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def unavailable(fingerprint: dict[str, Any]) -> str | None:
    """Why ``fingerprint``'s source could not be looked at (one line), or ``None`` when it could."""
    return fingerprint.get("unavailable")


def fingerprint_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """One line naming what differs between two fingerprints of :func:`source_fingerprint`, or ``None`` when equal.

    E.g. ``"/data/imgs: 4 files added (a.png, b.png, c.png, ...), 0 removed, 1 changed (x.png)"``.
    When either side could not be looked at (:func:`unavailable`), the line says so rather than ``None``.
    """
    if old == new:
        return None
    where = f"{new.get('spec')}"
    if old.get("spec") != new.get("spec"):
        return f"the data is another: {old.get('spec')} then, {new.get('spec')} now"
    if old.get("kind") == "files" and new.get("kind") == "missing":
        return f"{where} no longer exists (it held {old.get('count', 0)} files)"
    for side in (old, new):
        if unavailable(side):
            return f"{where} could not be compared: {unavailable(side)}"
    parts = []
    if old.get("options") != new.get("options"):
        parts.append(f"data options {json.dumps(old.get('options'))} then, {json.dumps(new.get('options'))} now")
    if old.get("kind") != new.get("kind"):
        parts.append(f"it is read as {new.get('kind')}, not {old.get('kind')}")
    elif old["kind"] == "cache" and old.get("content_sha256") != new.get("content_sha256"):
        parts.append(f"the cache was rebuilt with other content (sha256 {str(old.get('content_sha256'))[:12]} then, "
                     f"{str(new.get('content_sha256'))[:12]} now)")
    elif old["kind"] == "hub":
        if old.get("sha") != new.get("sha"):
            parts.append(f"revision {old.get('sha')} then, {new.get('sha')} now")
        parts.append(_listing_difference(old, new, "files"))
    elif old["kind"] == "files":
        parts.append(_listing_difference(old, new, "files"))
    parts = [p for p in parts if p]
    return f"{where}: {'; '.join(parts)}" if parts else None


# ----------------------------------------------------------------------------- listings


def _walk(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return found


def _shard_files(patterns: list[str]) -> list[Path]:
    """The tar shards the patterns name that exist now (a missing one is not an error here: it counts as removed)."""
    found: list[Path] = []
    for pattern in (p for text in patterns for p in expand_braces(text)):
        if glob.has_magic(pattern):
            found.extend(Path(p) for p in sorted(glob.glob(pattern)))
        elif os.path.isdir(pattern):
            found.extend(Path(p) for p in tars_under(Path(pattern)))
        elif os.path.isfile(pattern):
            found.append(Path(pattern))
    return list(dict.fromkeys(found))


def _common_folder(patterns: list[str]) -> Path:
    """The folder holding every shard the patterns name (whether they exist or not)."""
    return Path(os.path.commonpath([os.path.dirname(p) for text in patterns for p in expand_braces(text)]))


def _files(record: dict[str, Any], paths: list[Path], root: Path) -> dict[str, Any]:
    """``record`` with the listing of ``paths``, named relative to ``root``."""
    listing: dict[str, list[int]] = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:  # removed while listed
            continue
        listing[Path(os.path.relpath(path, root)).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return {**record, "root": os.fspath(root), **_summary(listing)}


def _summary(listing: dict[str, Any]) -> dict[str, Any]:
    """Count, bytes and digest of a listing, and the listing itself or its groups."""
    sizes = [v[0] if isinstance(v, list) else v for v in listing.values()]
    entries = json.dumps(sorted(listing.items()), separators=(",", ":"))
    summary = {"count": len(listing), "bytes": int(sum(s or 0 for s in sizes)),
               "digest": hashlib.sha256(entries.encode()).hexdigest()}
    if len(listing) <= LISTED_FILES:
        return {**summary, "files": listing}
    return {**summary, "groups": _groups(listing)}


def _group(name: str) -> str:
    return str(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % GROUPS)


def _groups(listing: dict[str, Any]) -> dict[str, list]:
    members: dict[str, list] = {}
    for name, value in sorted(listing.items()):
        members.setdefault(_group(name), []).append([name, value])
    return {g: [len(m), hashlib.sha256(json.dumps(m, separators=(",", ":")).encode()).hexdigest()[:16]]
            for g, m in sorted(members.items(), key=lambda kv: int(kv[0]))}


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMED]) + (", ..." if len(names) > _NAMED else "")
    return f" ({shown})" if names else ""


def _listing_difference(old: dict[str, Any], new: dict[str, Any], what: str) -> str:
    """``"N files added (...), M removed (...), K changed (...)"``, or for grouped listings the counts and groups."""
    if old.get("digest") == new.get("digest"):
        return ""
    if "files" in old and "files" in new:
        before, after = old["files"], new["files"]
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
        return (f"{len(added)} {what} added{_some(added)}, {len(removed)} removed{_some(removed)}, "
                f"{len(changed)} changed{_some(changed)}")
    groups = [side.get("groups") or _groups(side.get("files", {})) for side in (old, new)]
    differing = sum(1 for g in set(groups[0]) | set(groups[1]) if groups[0].get(g) != groups[1].get(g))
    return (f"{old.get('count')} {what} then, {new.get('count')} now; {differing} of {GROUPS} groups of names "
            "differ (names, sizes or modification times)")


def _hub(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the hub's commit and file sizes for the dataset id, or ``unavailable``."""
    try:
        from huggingface_hub import HfApi

        info = HfApi().dataset_info(record["spec"], revision=record["options"].get("revision"), files_metadata=True,
                                    timeout=_HUB_TIMEOUT_S)
    except Exception as error:  # offline, unreachable, unknown id, no access: said, not fatal
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return {**record, "unavailable": f"the hub could not be asked ({type(error).__name__}{': ' if detail else ''}"
                                         f"{detail[:200]})"}
    listing = {s.rfilename: s.size for s in (info.siblings or [])}
    return {**record, "sha": info.sha, **_summary(listing)}
