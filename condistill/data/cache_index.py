"""Recognising a latent cache folder by its ``index.json``, and the error for a damaged one.

Kept apart from :mod:`condistill.data.cache` (the dataset, which needs torch and the training
dataset) so that :func:`~condistill.data.sources.open_source` and
:mod:`condistill.data.fingerprint` can recognise a cache without importing either: the imports
go one way. :mod:`condistill.data.cache` re-exports everything here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "INDEX_NAME", "CacheDamagedError", "cache_folder_problem", "is_cache",
           "read_index"]

CACHE_FORMAT = "condistill-latent-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
FIRST_SHARD = "shard-00000.safetensors"


class CacheDamagedError(ValueError):
    """A latent cache's files are not what its index recorded: a shard missing, cut short, of another content
    hash, with an unreadable header or non-finite values, or the index itself unreadable.

    The message is one line: it contains "cache", names the damaged shard(s) and says how to rebuild.
    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's
    traceback as its message; the constructor keeps only the original line.
    """

    def __init__(self, message: str = ""):
        marker = f"{type(self).__name__}: "
        if "\nOriginal Traceback" in message and marker in message:  # torch's re-raise from a DataLoader worker
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def read_index(path: str | os.PathLike) -> dict[str, Any] | None:
    """The index of a complete cache at ``path``, or ``None`` (no readable index, not a cache, or incomplete).

    The shards are not looked at: :class:`~condistill.data.cache.CachedDataset` checks their sizes when
    it opens the cache and their content hashes when it first reads each one.
    """
    try:
        index = json.loads((Path(path) / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT or index.get("complete") is not True:
        return None
    if not isinstance(index.get("shards"), list):
        return None
    return index


def is_cache(path: str | os.PathLike) -> bool:
    """True if ``path`` holds the complete index of a latent cache written by ``condistill cache`` (its shards
    may still be damaged: reading them says so)."""
    return read_index(path) is not None


def cache_folder_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a folder that looks like a latent cache (an ``index.json`` beside
    ``shard-00000.safetensors``) but is not a complete one, or ``None`` (a complete cache, or no cache at all)."""
    folder = Path(path)
    index_file = folder / INDEX_NAME
    if not (index_file.is_file() and (folder / FIRST_SHARD).is_file()) or read_index(folder) is not None:
        return None
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"its {INDEX_NAME} cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        return None  # another program's index.json beside a file of that name: not ours
    if index.get("complete") is not True:
        return f"its {INDEX_NAME} does not say it is complete (a stopped `condistill cache` run?)"
    return f"its {INDEX_NAME} has no list of shards"
