"""Webdataset tar shards, read with the standard ``tarfile`` (no webdataset package needed).

``open_source`` picks :class:`WebDatasetSource` for ``.tar``/``.tar.gz``/``.tgz`` paths,
globs, brace patterns (:func:`expand_braces`), lists of them and folders holding only
shards. :func:`expand_shards` resolves such specs to files; :func:`is_tar_name` and
:func:`tars_under` are the tar-name helpers the spec dispatcher shares.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from condistill.data.images import ImageSanitizer
from condistill.data.record import Record
from condistill.data.skips import SkipItem
from condistill.data.source_base import ShardedSource, caption_from_cell

__all__ = ["WebDatasetSource", "expand_braces", "expand_shards", "is_tar_name", "tars_under", "TAR_SUFFIXES"]

logger = logging.getLogger(__name__)

#: File name endings read as tar shards.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style brace patterns as webdataset does.

    ``{000..003}`` is a numeric range (zero-padded to the width of its first bound),
    ``{a,b}`` a list of alternatives; several groups multiply out. A ``{...}`` that is
    neither is kept literally.

    >>> expand_braces("s-{00..02}.tar")
    ['s-00.tar', 's-01.tar', 's-02.tar']
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo_text, hi_text = rng.groups()
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} goes down; write it as {{{hi_text}..{lo_text}}}")
        width = len(lo_text)
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + option + t for option in options for t in expand_braces(tail)]


def is_tar_name(name: str) -> bool:
    """True if a file name ends like a tar shard (:data:`TAR_SUFFIXES`, any case)."""
    return name.lower().endswith(TAR_SUFFIXES)


def expand_shards(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Resolve shard specs (paths, globs, brace patterns, folders, or a list of them) to files.

    Raises:
        FileNotFoundError: a spec matches no file.
        ValueError: a remote URL (only local shards are read) or an empty list.
    """
    specs = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not specs:
        raise ValueError("no shards given; pass a .tar path, a glob, a brace pattern or a list of them")
    shards: list[str] = []
    missing: list[str] = []
    for spec in specs:
        text = os.fspath(spec)
        if "://" in text or text.startswith("pipe:"):
            raise ValueError(
                f"{text!r}: only local shard files are read; download the shards and pass their local paths"
            )
        for pattern in expand_braces(text):
            pattern = os.path.expanduser(pattern)
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    missing.append(f"{pattern!r} (a pattern matching no file)")
            elif os.path.isdir(pattern):
                matches = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if is_tar_name(f))
                if not matches:
                    missing.append(f"{pattern!r} (a folder without .tar shards)")
            elif os.path.isfile(pattern):
                matches = [pattern]
            else:
                matches = []
                missing.append(repr(pattern))
            shards.extend(matches)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {shown}; check the paths or the brace pattern")
    return list(dict.fromkeys(shards))


class WebDatasetSource(ShardedSource):
    """Samples from webdataset-format tar shards, read with the standard ``tarfile``.

    Members are grouped into samples by key (the member path up to the first dot of its
    file name); a sample's members must be consecutive, as webdataset writes them. The
    image is the first present of ``image_extensions``; the caption is the ``txt`` member,
    else the ``caption``/``text`` entry of the ``json`` member, else empty. Corrupt
    images are skipped and counted; an unreadable or truncated shard is counted in
    ``stats.errors`` and reading goes on with the next shard (the samples read before the
    damage are kept). The length is not known in advance.

    Args:
        urls: a shard path, glob, brace pattern (``shard-{000..003}.tar``), folder of
            shards, or a list of these. ``.tar``, ``.tar.gz`` and ``.tgz`` are read.
        resolution: output side length.
        min_size: skip images whose shorter side is smaller (default ``resolution // 2``).
        crop: ``"center"`` or ``"random"``.
        seed: random-crop seed.
        image_extensions: member extensions tried for the image, in order.
        caption_keys: keys tried in the ``json`` member when there is no ``txt``.
        conditioning_extension: member extension of an optional conditioning image
            (e.g. ``"cond.png"``).
    """

    def __init__(
        self,
        urls: str | os.PathLike | Iterable[str | os.PathLike],
        resolution: int = 64,
        *,
        min_size: int | None = None,
        crop: str = "center",
        seed: int = 0,
        image_extensions: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_keys: Sequence[str] = ("caption", "text"),
        conditioning_extension: str | None = None,
    ):
        self.shards = expand_shards(urls)
        label = self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]} and {len(self.shards) - 1} more shards"
        super().__init__(resolution, f"WebDatasetSource({label!r})")
        self.sanitizer = ImageSanitizer(resolution, min_size=min_size, crop=crop, seed=seed)
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        self.caption_keys = tuple(caption_keys)
        self.conditioning_extension = conditioning_extension.lower().lstrip(".") if conditioning_extension else None

    # ------------------------------------------------------------------ one shard at a time
    def shard_samples(self, shard: str, report: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Yield ``(key, {extension: bytes})`` for each complete sample of one shard, in file order.

        The shard is read as a stream, member by member: only the sample being assembled is in
        memory, never the shard. ``report=False`` leaves damaged shards out of :attr:`stats`
        (for a second pass, e.g. :meth:`count_samples`).
        """
        return self._samples(shard, report)

    def decode_sample(self, shard: str, key: str, members: dict[str, bytes]) -> Record | None:
        """The record of one sample, or ``None`` when it is unusable; counted in :attr:`stats`
        under ``"<shard>::<key>"`` either way."""
        return self.observe_decode(f"{shard}::{key}", lambda: self._decode(shard, key, members))

    def _samples(self, shard: str, report: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
        try:
            tar = tarfile.open(shard, mode="r|*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            if report:
                self.stats.error("corrupt_shard", f"{shard}: {exc}")
                logger.warning("skipping unreadable shard %s: %s", shard, exc)
            return
        current: str | None = None
        members: dict[str, bytes] = {}
        with tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                    if report:
                        self._damaged(shard, str(exc), current)
                    return
                if member is None:
                    break
                tar.members.clear()  # a streamed tar keeps every header it read; keep none
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                stem, dot, ext = base.partition(".")
                if not dot or not stem or base.startswith("."):
                    continue
                key = posixpath.join(dirname, stem) if dirname not in ("", ".") else stem
                if key != current:
                    # a new key starts, so the previous sample is complete
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                try:
                    fh = tar.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} ends early")
                except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                    if report:
                        self._damaged(shard, str(exc), current)
                    return
                members[ext.lower()] = data
            # tarfile ends quietly at a cut-off header; an uncompressed tar written in full
            # ends with two zero blocks (1024 bytes) after the last member
            if getattr(tar.fileobj, "comptype", None) == "tar":
                try:
                    missing_end = os.path.getsize(shard) - tar.offset < 2 * tarfile.BLOCKSIZE
                except OSError:
                    missing_end = False
                if missing_end:
                    if report:
                        self._damaged(shard, "the file ends without the end-of-archive blocks", current)
                    return
        if current is not None:
            yield current, members

    def _damaged(self, shard: str, detail: str, pending: str | None) -> None:
        self.stats.error("truncated_shard", f"{shard}: {detail}")
        logger.warning("shard %s is damaged (%s); kept the samples before the damage", shard, detail)
        if pending is not None:
            # the sample being read when the damage was hit may miss members: drop it
            self.stats.observe(f"{shard}::{pending}", skipped=SkipItem("truncated", "cut off by shard damage"))

    def _decode(self, shard: str, key: str, members: dict[str, bytes]) -> tuple[Record, list[str]]:
        image_ext = next((e for e in self.image_extensions if e in members), None)
        if image_ext is None:
            raise SkipItem("no_image", f"members {sorted(members)} have none of {list(self.image_extensions)}")
        caption = ""
        metadata: dict[str, Any] | None = None
        if "json" in members:
            try:
                parsed = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SkipItem("corrupt_json", str(exc)) from exc
            metadata = parsed if isinstance(parsed, dict) else {"json": parsed}
        if "txt" in members:
            caption = members["txt"].decode("utf-8", errors="replace").strip()
        elif metadata is not None:
            for caption_key in self.caption_keys:
                if metadata.get(caption_key) is not None:
                    caption = caption_from_cell(metadata[caption_key], self.sanitizer.seed, key)
                    break
        prepared = self.sanitizer.prepare(members[image_ext], key)
        conditioning = None
        if self.conditioning_extension and self.conditioning_extension in members:
            conditioning = self.sanitizer.align_image(members[self.conditioning_extension], prepared)
        attributes: dict[str, Any] = {"shard": shard}
        if metadata is not None:
            attributes["metadata"] = metadata
        record = Record(image=prepared.image, caption=caption, conditioning=conditioning, attributes=attributes, key=key)
        return record, prepared.conversions



def tars_under(path: Path) -> list[str]:
    """Every tar shard under a folder, recursively, in sorted order; hidden files and folders skipped."""
    tars = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        tars.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_tar_name(f) and not f.startswith("."))
    return tars
