"""The latent cache: what the frozen encoders compute from the training data, computed once.

``condistill cache`` (:func:`condistill.data.cache_writer.write_cache`) stores, per item, the
VAE latent (the distribution's mean, already scaled), the caption's text embedding and the
condition tensor, in safetensors shards with an ``index.json``. :class:`CachedDataset` reads
them back item by item (one shard open at a time, tensors read on access, never the whole
cache); :meth:`CachedDataset.check` refuses a cache made for another base, resolution,
condition or seed.

Layout of a cache folder:

* ``index.json``: ``format``, ``version``, ``complete: true`` (written last, and the folder only
  gets its name once everything is written), the item count, the shards with their item counts,
  byte sizes and SHA-256 content hashes, the base (name, :func:`~condistill.frozen.compute_fingerprint`
  fingerprint, a digest of its VAE and text-encoder weight files), the resolution, the condition
  name and config, the seed and how item seeds were derived from it, the storage dtypes, the data
  spec and options, and ``source``: the :func:`~condistill.data.fingerprint.source_fingerprint` of
  the data, taken when the build started;
* ``shard-00000.safetensors``, ...: tensors ``latents.<i>``, ``conditioning.<i>`` (``uint8`` when
  ``round(255 c) / 255`` gives ``c`` back exactly, else the float storage dtype), ``prompt.<j>``
  (or ``prompt.<j>.<name>`` for a dict of tensors), one per distinct caption of the shard; the
  shard's metadata ``items`` lists each item's key, caption, prompt slot and conditioning kind;
* ``data_report.json``: the source's skip report when the cache was written.

What is checked, and when (nothing is trusted blindly, and nothing reads the whole cache at open):

* opening (:class:`CachedDataset`): the index; every shard is there with its recorded size (one
  ``stat`` each); the data source against the recorded fingerprint. A source that changed (files
  added, removed or changed, another hub revision), is gone or cannot be reached is named in one
  warning line, and training goes on with the cache as it was built: the cache holds everything
  training reads, and moving or deleting the images after caching them is a reason to cache.
* first read of each shard in a process: its SHA-256 against the index, its safetensors header, its
  item list, and every float tensor finite. A DataLoader worker checks the shards it reads itself,
  so with ``W`` workers a shard may be hashed up to ``W`` times in a run.
* :func:`verify_cache` (``condistill cache --verify``): all of that for every shard, now.
* a damaged shard raises :class:`CacheDamagedError`, one line naming the shard(s) and the command
  that rebuilds the cache. A cache written before shards had hashes and the source a fingerprint
  is read with one warning line: its shards are checked for size, header, items and finite values.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from condistill.data.cache_index import (CACHE_FORMAT, CACHE_VERSION, INDEX_NAME, CacheDamagedError,
                                         cache_folder_problem, is_cache, read_index)
from condistill.data.dataset import DATA_EVENTS_KEY
from condistill.data.fingerprint import fingerprint_difference, source_fingerprint, unavailable
from condistill.data.skips import SourceStats
from condistill.files import sha256_file
from condistill.utils import jsonable

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "INDEX_NAME", "CacheDamagedError", "CacheMismatchError", "CachedDataset",
           "is_cache", "read_index", "rebuild_command", "verify_cache"]

logger = logging.getLogger(__name__)
_OPEN_SHARDS = 2  # shards a reader keeps open (per process)
_SHOWN = 5  # damaged shards named in one message
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: per process: (cache, its recorded source, log) -> the source's difference; a cache opened again with the
#: same log (the loop's validation batch, a second look) is not compared or said again
_CHECKED: dict[tuple[str, str, Any], str | None] = {}


class CacheMismatchError(ValueError):
    """The cache was computed for another base, resolution, condition or seed than the run's."""


def rebuild_command(index: dict[str, Any], path: str | os.PathLike, **run: Any) -> str:
    """The ``condistill cache`` command that writes the cache at ``path`` again: with the settings ``index``
    records, or the run's where given (``resolution``, ``seed``, ``condition_name``, ``condition_config``, ``base``)."""
    condition = run.get("condition_name", index["condition"]["name"])
    config = run.get("condition_config", index["condition"]["config"])
    options = {k: v for k, v in config.items() if k != "name"} if isinstance(config, dict) else {}
    words = ["condistill", "cache", "--condition", condition, "--data", str(index.get("data")),
             "--resolution", str(run.get("resolution", index["resolution"])), "--seed", str(run.get("seed", index["seed"])),
             "--out", os.fspath(path), "--overwrite"]
    if options:
        words += ["--condition-options", json.dumps(jsonable(options))]
    if index.get("data_options"):
        words += ["--data-options", json.dumps(index["data_options"])]
    if index.get("storage", {}).get("dtype", "float16") != "float16":
        words += ["--dtype", index["storage"]["dtype"]]
    base = run.get("base", index.get("base", {}).get("name_or_path"))
    text = " ".join(shlex.quote(str(w)) for w in words)
    if base:  # a placeholder such as "<the run's base>" stays as it is
        text += " --base " + (str(base) if str(base).startswith("<") else shlex.quote(str(base)))
    return text


def _damaged(path: Path, index: dict[str, Any] | None, problems: list[str]) -> str:
    """The one line of a :class:`CacheDamagedError`."""
    shown = "; ".join(problems[:_SHOWN]) + (f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")
    command = (rebuild_command(index, path) if index is not None else
               f"condistill cache --condition C --data SRC --out {shlex.quote(os.fspath(path))} --overwrite "
               "(with the settings it was built with)")
    return (f"the latent cache {os.fspath(path)!r} is damaged: {shown}. Rebuild it with `{command}`; "
            f"`condistill cache --verify {shlex.quote(os.fspath(path))}` checks every shard of it")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _size_problem(folder: Path, shard: dict[str, Any]) -> str | None:
    """A shard's file missing or of another size than recorded (one ``stat``), else ``None``."""
    try:
        size = (folder / shard["file"]).stat().st_size
    except OSError:
        return f"{shard['file']} is missing"
    if size != shard["bytes"]:
        return f"{shard['file']} has {size:,} bytes where the index recorded {shard['bytes']:,}"
    return None


def _shard_problem(folder: str | os.PathLike, index: dict[str, Any], s: int) -> str | None:
    """What is wrong with shard ``s`` of the cache at ``folder`` (``None``: nothing): its size, its content hash
    (when recorded), its safetensors header, its item list, the tensors of its items and that every float
    tensor is finite. Reads the whole shard."""
    from safetensors import safe_open

    folder, shard = Path(folder), index["shards"][s]
    problem = _size_problem(folder, shard)
    if problem:
        return problem
    name = shard["file"]
    if shard.get("sha256") and sha256_file(folder / name) != shard["sha256"]:
        return f"{name} does not have the content (SHA-256) the index recorded"
    names = index.get("storage", {}).get("prompt_names")
    try:
        with safe_open(os.fspath(folder / name), framework="pt", device="cpu") as handle:
            items = json.loads(handle.metadata()["items"])
            if len(items) != int(shard["items"]):
                return f"{name} lists {len(items)} items where the index recorded {shard['items']}"
            keys = set(handle.keys())
            wanted = {f"{kind}.{i}" for i in range(len(items)) for kind in ("latents", "conditioning")}
            wanted |= {f"prompt.{item['prompt']}" + (f".{n}" if n else "") for item in items for n in (names or [None])}
            if wanted - keys:
                return f"{name} lacks the tensors {', '.join(sorted(wanted - keys)[:3])}"
            bad = [key for key in sorted(keys) if handle.get_slice(key).get_dtype() in _FLOAT_DTYPES
                   and not bool(torch.isfinite(handle.get_tensor(key)).all())]
    except Exception as error:  # SafetensorError, a bad metadata entry, an unreadable file: the shard is damaged
        return f"{name} cannot be read as a shard of this cache ({_first_line(error)})"
    if bad:
        return f"{name} holds non-finite values (NaN or inf) in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}"
    return None


def _check_source(folder: Path, index: dict[str, Any], log: Callable[[str], Any]) -> str | None:
    """Compare the cache's data with its recorded source, say how it differs with ``log`` (one line), and return
    the difference (``None``: the same, or nothing recorded to compare with). Once per process and ``log``."""
    recorded = index.get("source")
    hashed = all("sha256" in shard for shard in index["shards"])
    key = (os.fspath(folder.resolve()), json.dumps(recorded, sort_keys=True) + f"|{hashed}", log)
    if key in _CHECKED:
        return _CHECKED[key]
    where, change, line = repr(os.fspath(folder)), None, None
    if recorded is None or not hashed:
        line = (f"the latent cache {where} was written before caches recorded content hashes and their source: its "
                "shards are checked for size, header, items and finite values only, and a change of its data goes "
                f"unseen; rebuild it to have both with `{rebuild_command(index, folder)}`")
    else:
        current = source_fingerprint(recorded["spec"], recorded.get("options"))
        change = fingerprint_difference(recorded, current)
        if change and (unavailable(current) or unavailable(recorded)):
            line = f"the data of the latent cache {where} was not checked: {change}; training on the cache as it was built"
        elif change:
            line = (f"the data of the latent cache {where} changed since it was built ({change}); training on the "
                    "cache as it was built. To train on the data as it is now, rebuild it with "
                    f"`{rebuild_command(index, folder)}`")
    _CHECKED[key] = change
    if line:
        log(line)
    return change


class CachedDataset(Dataset):
    """A latent cache as a map-style dataset: item ``i`` is cache item ``i``.

    ``dataset[i]`` is a dict: ``latents`` float32 ``[c, h, w]``; ``prompt_embeds`` float32
    ``[L, D]`` (or a dict of float32 tensors, as the base's ``encode_prompts`` returned);
    ``conditioning`` float32 ``[C, H, W]`` in ``[0, 1]``; ``caption``; ``key``. A cache of a
    random-access source holds item ``i`` of ``ConditionDataset(source, condition, resolution,
    seed)`` at index ``i`` (an unusable item replaced as there), so the loop's batch sampler picks
    the same images from the cache as from the data.

    Args:
        path: the cache folder.
        log: where the one-line notes go (a changed, gone or unreachable source; a cache written before
            shards had hashes), once per process [``logging`` warning].
        check_source: compare the data with the source the cache recorded (a ``stat`` per file of a
            folder source, a hub query for a hub dataset) [True].

    Attributes:
        index: the cache's ``index.json`` as a dict.
        resolution, seed, condition_name, condition_config, base_fingerprint: what it was made for.
        source_change: how its data differs from the recorded source (one line), or ``None``.

    Raises:
        ValueError: ``path`` is not a complete cache (the message says how to make one).
        CacheDamagedError: the index is unreadable, or a shard is missing or of another size; reading a
            shard whose content, header or values are damaged raises it too.
    """

    def __init__(self, path: str | os.PathLike, *, log: Callable[[str], Any] | None = None,
                 check_source: bool = True):
        self.path = Path(path)
        index = read_index(self.path)
        if index is None:
            problem = cache_folder_problem(self.path)
            if problem:
                raise CacheDamagedError(_damaged(self.path, None, [problem]))
            raise ValueError(f"{os.fspath(path)!r} is not a complete condistill latent cache (no complete {INDEX_NAME}); "
                             "a stopped `condistill cache` run leaves none: run it again")
        if index.get("version") != CACHE_VERSION:
            raise ValueError(f"{os.fspath(path)!r} is a cache of format version {index.get('version')}, this condistill "
                             f"reads version {CACHE_VERSION}; rebuild it with `condistill cache ... --overwrite`")
        self.index = index
        try:
            self.resolution = int(index["resolution"])
            self.seed = int(index["seed"])
            self.condition_name = index["condition"]["name"]
            self.condition_config = index["condition"]["config"]
            self.base_fingerprint = index["base"]["fingerprint"]
            self.channels = int(index["condition"]["channels"])
            self._starts = [0]
            for shard in index["shards"]:
                self._starts.append(self._starts[-1] + int(shard["items"]))
            problems = [p for shard in index["shards"] if (p := _size_problem(self.path, shard))]
        except (KeyError, TypeError, ValueError) as error:
            raise CacheDamagedError(_damaged(self.path, None, [f"its {INDEX_NAME} lacks an entry ({_first_line(error)})"]))
        if problems:
            raise CacheDamagedError(_damaged(self.path, index, problems))
        self.stats = SourceStats(name=f"CachedDataset({os.fspath(path)!r})")
        self._open: dict[int, tuple[Any, list[dict[str, Any]]]] = {}
        self._verified: set[int] = set()  # shards checked in full (carried to DataLoader workers)
        self.source_change = _check_source(self.path, index, log or logger.warning) if check_source else None

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
            command = rebuild_command(self.index, self.path, resolution=resolution, seed=seed, base="<the run's base>",
                                      condition_name=condition_name, condition_config=condition_config)
            raise CacheMismatchError(f"the latent cache {os.fspath(self.path)!r} was made for other settings than this "
                                     f"run (cache != run): {'; '.join(problems)}. Rebuild it with `{command}`, or "
                                     "train on the data itself")

    # ------------------------------------------------------------------ items
    def _shard(self, s: int) -> tuple[Any, list[dict[str, Any]]]:
        if s not in self._open:
            from safetensors import safe_open

            if s not in self._verified:
                problem = _shard_problem(self.path, self.index, s)
                if problem:
                    raise CacheDamagedError(_damaged(self.path, self.index, [problem]))
                self._verified.add(s)
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
        try:
            meta = items[local]
            latents = handle.get_tensor(f"latents.{local}").float()
            conditioning = handle.get_tensor(f"conditioning.{local}")
            slot = meta["prompt"]
            names = self.index["storage"]["prompt_names"]
            if names is None:
                prompt = handle.get_tensor(f"prompt.{slot}").float()
            else:
                prompt = {name: handle.get_tensor(f"prompt.{slot}.{name}").float() for name in names}
        except Exception as error:  # checked when first read, so changed since: the file is being replaced or damaged
            problem = f"{self.index['shards'][s]['file']} cannot be read ({_first_line(error)})"
            raise CacheDamagedError(_damaged(self.path, self.index, [problem])) from None
        conditioning = conditioning.float().div_(255.0) if conditioning.dtype == torch.uint8 else conditioning.float()
        self.stats.observe(f"#{index}")
        return {"latents": latents, "prompt_embeds": prompt,
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


def verify_cache(path: str | os.PathLike, log: Callable[[str], Any] = print) -> None:
    """Check every shard of the latent cache at ``path`` now (``condistill cache --verify``).

    Each shard's size, SHA-256 (when the cache recorded it), safetensors header, item list and tensors, and
    that every float tensor is finite; then the data against the recorded source. Reads the whole cache:
    about as long as reading it from disk once (hundreds of GB for a million images at 512 px). Every
    shard is checked before anything is raised, so one error names all the damaged ones.

    Args:
        path: the cache folder.
        log: where each damaged shard, the source note and the final summary line go.

    Raises:
        CacheDamagedError: one line naming the damaged shards (the first five, then how many more) and the
            command that rebuilds the cache.
        ValueError: ``path`` is not a latent cache at all.
    """
    folder = Path(path)
    index = read_index(folder)
    if index is None:
        problem = cache_folder_problem(folder)
        if problem:
            raise CacheDamagedError(_damaged(folder, None, [problem]))
        raise ValueError(f"{os.fspath(path)!r} is not a condistill latent cache (no complete {INDEX_NAME})")
    problems = []
    for s in range(len(index["shards"])):
        try:
            problem = _shard_problem(folder, index, s)
        except (KeyError, TypeError, ValueError) as error:
            problem = f"the {INDEX_NAME} entry of shard {s} is unreadable ({_first_line(error)})"
        if problem:
            problems.append(problem)
            log(f"cache: {problem}")
    counted = sum(int(shard.get("items", 0)) for shard in index["shards"] if isinstance(shard, dict))
    if counted != index.get("items"):
        problems.append(f"{INDEX_NAME} says {index.get('items')} items but its shards hold {counted}")
        log(f"cache: {problems[-1]}")
    _check_source(folder, index, log)
    if problems:
        raise CacheDamagedError(_damaged(folder, index, problems))
    hashed = all("sha256" in shard for shard in index["shards"])
    log(f"cache {os.fspath(folder)}: {len(index['shards'])} shard(s), {index.get('items')} items verified "
        f"({'content hashes, ' if hashed else 'no content hashes recorded; '}sizes, headers, items, finite values)")
