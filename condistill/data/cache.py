"""The latent cache: what the frozen encoders compute from the training data, computed once.

``condistill cache`` (:func:`condistill.data.cache_writer.write_cache`) stores, per item, the
VAE latent (the distribution's mean, already scaled), the caption's text embedding and the
condition tensor, in safetensors shards with an ``index.json``. :class:`CachedDataset` reads
them back item by item (one shard open at a time, tensors read on access, never the whole
cache); :meth:`CachedDataset.check` refuses a cache made for another base, resolution,
condition or seed.

Layout of a cache folder:

* ``index.json``: ``format``, ``version``, ``complete: true`` (written last, and the folder only
  gets its name once everything is written), the item count, the shards with their item counts
  and byte sizes, the base (name, :func:`~condistill.frozen.compute_fingerprint` fingerprint, a
  digest of its VAE and text-encoder weight files), the resolution, the condition name and
  config, the seed and how item seeds were derived from it, the storage dtypes, the data spec;
* ``shard-00000.safetensors``, ...: tensors ``latents.<i>``, ``conditioning.<i>`` (``uint8`` when
  ``round(255 c) / 255`` gives ``c`` back exactly, else the float storage dtype), ``prompt.<j>``
  (or ``prompt.<j>.<name>`` for a dict of tensors), one per distinct caption of the shard; the
  shard's metadata ``items`` lists each item's key, caption, prompt slot and conditioning kind;
* ``data_report.json``: the source's skip report when the cache was written.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from condistill.data.dataset import DATA_EVENTS_KEY
from condistill.data.skips import SourceStats
from condistill.utils import jsonable

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "INDEX_NAME", "CacheMismatchError", "CachedDataset", "is_cache",
           "read_index"]

CACHE_FORMAT = "condistill-latent-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
_OPEN_SHARDS = 2  # shards a reader keeps open (per process)


class CacheMismatchError(ValueError):
    """The cache was computed for another base, resolution, condition or seed than the run's."""


def read_index(path: str | os.PathLike) -> dict[str, Any] | None:
    """The index of a complete cache at ``path``, or ``None`` (no index, not a cache, incomplete, a shard missing
    or of another size than recorded)."""
    folder = Path(path)
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT or index.get("complete") is not True:
        return None
    try:
        for shard in index["shards"]:
            if (folder / shard["file"]).stat().st_size != shard["bytes"]:
                return None
    except (OSError, KeyError, TypeError):
        return None
    return index


def is_cache(path: str | os.PathLike) -> bool:
    """True if ``path`` is a complete latent cache written by ``condistill cache``."""
    return read_index(path) is not None


class CachedDataset(Dataset):
    """A latent cache as a map-style dataset: item ``i`` is cache item ``i``.

    ``dataset[i]`` is a dict: ``latents`` float32 ``[c, h, w]``; ``prompt_embeds`` float32
    ``[L, D]`` (or a dict of float32 tensors, as the base's ``encode_prompts`` returned);
    ``conditioning`` float32 ``[C, H, W]`` in ``[0, 1]``; ``caption``; ``key``. A cache of a
    random-access source holds item ``i`` of ``ConditionDataset(source, condition, resolution,
    seed)`` at index ``i`` (an unusable item replaced as there), so the loop's batch sampler picks
    the same images from the cache as from the data.

    Attributes:
        index: the cache's ``index.json`` as a dict.
        resolution, seed, condition_name, condition_config, base_fingerprint: what it was made for.

    Raises:
        ValueError: ``path`` is not a complete cache (the message says how to make one).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = read_index(self.path)
        if index is None:
            raise ValueError(f"{os.fspath(path)!r} is not a complete condistill latent cache (no complete {INDEX_NAME}, "
                             "or a shard is missing); a stopped `condistill cache` run leaves none: run it again")
        if index.get("version") != CACHE_VERSION:
            raise ValueError(f"{os.fspath(path)!r} is a cache of format version {index.get('version')}, this condistill "
                             f"reads version {CACHE_VERSION}; rebuild it with `condistill cache ... --overwrite`")
        self.index = index
        self.resolution = int(index["resolution"])
        self.seed = int(index["seed"])
        self.condition_name = index["condition"]["name"]
        self.condition_config = index["condition"]["config"]
        self.base_fingerprint = index["base"]["fingerprint"]
        self.channels = int(index["condition"]["channels"])
        self._starts = [0]
        for shard in index["shards"]:
            self._starts.append(self._starts[-1] + int(shard["items"]))
        self.stats = SourceStats(name=f"CachedDataset({os.fspath(path)!r})")
        self._open: dict[int, tuple[Any, list[dict[str, Any]]]] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # file handles stay in the process that opened them
        return state

    # ------------------------------------------------------------------ checks
    def check(self, base_fingerprint: dict[str, Any], resolution: int, condition_name: str,
              condition_config: dict[str, Any], seed: int, encoders_digest: str | None = None) -> None:
        """Refuse the cache unless it was made for exactly these settings.

        Args:
            base_fingerprint: ``base.fingerprint()`` of the run's base.
            resolution, condition_name, condition_config (``condition.config()``), seed: the run's.
            encoders_digest: optional :func:`condistill.data.cache_writer.encoders_digest` of the
                run's base (tells apart two bases of the same architecture).

        Raises:
            CacheMismatchError: naming every difference and the command that rebuilds the cache.
        """
        from condistill.frozen import fingerprint_mismatch

        problems = [f"base {p}" for p in fingerprint_mismatch(self.base_fingerprint, base_fingerprint)]
        if set(self.base_fingerprint) != set(base_fingerprint):
            problems.append(f"base fingerprint keys {sorted(self.base_fingerprint)} != {sorted(base_fingerprint)}")
        recorded = self.index["base"].get("encoders_digest")
        if encoders_digest is not None and recorded is not None and encoders_digest != recorded:
            problems.append(f"base VAE/text-encoder weights differ (digest {recorded[:12]} != {encoders_digest[:12]})")
        if int(resolution) != self.resolution:
            problems.append(f"resolution {self.resolution} != {resolution}")
        if condition_name != self.condition_name:
            problems.append(f"condition {self.condition_name!r} != {condition_name!r}")
        elif jsonable(condition_config) != jsonable(self.condition_config):
            problems.append(f"condition config {json.dumps(self.condition_config)} != {json.dumps(jsonable(condition_config))}")
        if int(seed) != self.seed:
            problems.append(f"seed {self.seed} != {seed}")
        if problems:
            options = {k: v for k, v in condition_config.items() if k != "name"} if isinstance(condition_config, dict) else {}
            command = (f"condistill cache --condition {condition_name} --data {self.index.get('data')} "
                       f"--resolution {resolution} --seed {seed} --out {self.path} --overwrite"
                       + (f" --condition-options '{json.dumps(jsonable(options))}'" if options else "")
                       + " --base <the run's base>")
            raise CacheMismatchError(f"the latent cache {os.fspath(self.path)!r} was made for other settings than this "
                                     f"run (cache != run): {'; '.join(problems)}. Rebuild it with `{command}`, or "
                                     "train on the data itself")

    # ------------------------------------------------------------------ items
    def _shard(self, s: int) -> tuple[Any, list[dict[str, Any]]]:
        if s not in self._open:
            from safetensors import safe_open

            if len(self._open) >= _OPEN_SHARDS:
                self._open.pop(next(iter(self._open)))
            handle = safe_open(os.fspath(self.path / self.index["shards"][s]["file"]), framework="pt", device="cpu")
            self._open[s] = (handle, json.loads(handle.metadata()["items"]))
        return self._open[s]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, int) and not hasattr(index, "__index__"):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        n, index = len(self), int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a cache of {n} items")
        s = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[s]
        handle, items = self._shard(s)
        meta = items[local]
        conditioning = handle.get_tensor(f"conditioning.{local}")
        conditioning = conditioning.float().div_(255.0) if conditioning.dtype == torch.uint8 else conditioning.float()
        slot = meta["prompt"]
        names = self.index["storage"]["prompt_names"]
        if names is None:
            prompt = handle.get_tensor(f"prompt.{slot}").float()
        else:
            prompt = {name: handle.get_tensor(f"prompt.{slot}.{name}").float() for name in names}
        self.stats.observe(f"#{index}")
        return {"latents": handle.get_tensor(f"latents.{local}").float(), "prompt_embeds": prompt,
                "conditioning": conditioning, "caption": meta["caption"], "key": meta["key"]}

    # ------------------------------------------------------------------ what the loop's monitor reads
    def track_events(self) -> None:
        """Queue item observations for :meth:`collate` (a cache holds usable items only: nothing is skipped)."""
        self.stats.open_outbox()

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Stack ``latents``, ``prompt_embeds`` (per entry for a dict) and ``conditioning``; list captions and keys."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        first = items[0]["prompt_embeds"]
        if isinstance(first, dict):
            prompts: Any = {name: torch.stack([item["prompt_embeds"][name] for item in items]) for name in first}
        else:
            prompts = torch.stack([item["prompt_embeds"] for item in items])
        return {
            "latents": torch.stack([item["latents"] for item in items]),
            "prompt_embeds": prompts,
            "conditioning": torch.stack([item["conditioning"] for item in items]),
            "caption": [item["caption"] for item in items],
            "key": [item["key"] for item in items],
            DATA_EVENTS_KEY: self.stats.drain(),
        }
