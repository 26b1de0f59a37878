"""Writing the latent cache (``condistill cache``); reading it is :mod:`condistill.data.cache`.

:func:`write_cache` computes, for every item the training run would read, the VAE latent
(``base.encode_images``: the mean, scaled), the caption's embedding (``base.encode_prompts``,
once per distinct caption of a shard) and the condition tensor, and writes them in shards of
``shard_size`` items. Only one shard is in memory at a time.

What the cache freezes is what training already freezes: item ``i`` of a random-access source
gets the condition ``condition(record_i, seed=derive_seed(seed, i))`` exactly as
``ConditionDataset(source, condition, resolution, seed)`` computes it (identical every epoch);
a stream-only source's sample gets :func:`~condistill.data.streaming.item_seed` of its
identity, exactly as ``StreamingConditionDataset`` computes it.

Every shard's SHA-256 is recorded with it, and the data's
:func:`~condistill.data.fingerprint.source_fingerprint` (taken before the first item is read), so
that reading the cache can tell damage and a changed source (:mod:`condistill.data.cache`).
Non-finite latents or embeddings are refused here, not written: they would make training diverge.

The folder appears under its name only when complete: everything is written to a hidden
``.<name>.partial-<pid>`` folder next to it, ``index.json`` last, then the folder is renamed.
A stopped run leaves only that hidden folder (removed by the next run once its process is gone).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch

from condistill.data.cache_index import CACHE_FORMAT, CACHE_VERSION, INDEX_NAME, cache_folder_problem, is_cache
from condistill.data.fingerprint import source_fingerprint
from condistill.data.report import REPORT_NAME, write_report
from condistill.files import sha256_file
from condistill.files import set_shared_mode
from condistill.utils import jsonable

__all__ = ["DTYPES", "cache_command", "encoders_digest", "write_cache"]

#: storage dtypes of the float tensors (latents, embeddings, conditions that are not exact in uint8)
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_DIGEST_BYTES = 4 << 20  # bytes hashed at each end of every weight file


def encoders_digest(base_name_or_path: str | os.PathLike) -> str:
    """A digest of the base's VAE and text-encoder weight files (whatever dtype they are loaded in).

    Hashes each file's name, size and its first and last 4 MiB: two bases of the same architecture
    (one fingerprint) with different encoder weights get different digests.
    """
    from condistill.hub import resolve_pretrained_dir

    root = resolve_pretrained_dir(base_name_or_path, what="base model")
    digest = hashlib.sha256()
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix not in (".safetensors", ".bin"):
                continue
            size = path.stat().st_size
            digest.update(f"{sub}/{path.name}:{size}".encode())
            with path.open("rb") as f:
                digest.update(f.read(_DIGEST_BYTES))
                if size > 2 * _DIGEST_BYTES:
                    f.seek(size - _DIGEST_BYTES)
                    digest.update(f.read())
    return digest.hexdigest()


class _ShardWriter:
    """Collects one shard's tensors and writes them as one safetensors file."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder, self.dtype = folder, dtype
        self.shards: list[dict[str, Any]] = []
        self.prompt_names: list[str] | None | bool = False  # False: not known yet
        self.uint8_conditions = self.float_conditions = 0
        self._reset()

    def _reset(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.items: list[dict[str, Any]] = []
        self.slots: dict[str, int] = {}

    def add(self, latents: torch.Tensor, conditioning: torch.Tensor, caption: str, key: str, encode) -> None:
        i = len(self.items)
        self.tensors[f"latents.{i}"] = latents.to("cpu", self.dtype).contiguous()
        codes = torch.round(conditioning * 255.0)
        if torch.equal(codes / 255.0, conditioning):
            self.tensors[f"conditioning.{i}"], kind = codes.to(torch.uint8), "uint8"
            self.uint8_conditions += 1
        else:
            self.tensors[f"conditioning.{i}"], kind = conditioning.to(self.dtype).contiguous(), "float"
            self.float_conditions += 1
        if caption not in self.slots:
            self.slots[caption] = slot = len(self.slots)
            self._add_prompt(slot, encode([caption]), key)
        self.items.append({"key": key, "caption": caption, "prompt": self.slots[caption], "conditioning": kind})

    def _add_prompt(self, slot: int, embeds: Any, key: str) -> None:
        names = sorted(embeds) if isinstance(embeds, dict) else None
        if self.prompt_names is False:
            self.prompt_names = names
        elif names != self.prompt_names:
            raise ValueError(f"encode_prompts returned {names or 'a tensor'} for one caption and "
                             f"{self.prompt_names or 'a tensor'} for another")
        parts = {f"prompt.{slot}": embeds} if names is None else {f"prompt.{slot}.{n}": embeds[n] for n in names}
        for name, tensor in parts.items():
            if not isinstance(tensor, torch.Tensor) or tensor.ndim < 1 or tensor.shape[0] != 1:
                raise ValueError(f"encode_prompts([caption]) must give tensors with a batch axis of 1; {name} is "
                                 f"{getattr(tensor, 'shape', type(tensor).__name__)}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"the base's text encoder gave non-finite values (NaN or inf) for the caption of item "
                                 f"{key!r}; nothing was cached")
            self.tensors[name] = tensor[0].to("cpu", self.dtype).contiguous()

    def flush(self) -> None:
        if not self.items:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.tensors, os.fspath(self.folder / name), metadata={"items": json.dumps(self.items)})
        self.shards.append({"file": name, "items": len(self.items), "bytes": (self.folder / name).stat().st_size,
                            "sha256": sha256_file(self.folder / name)})
        self._reset()


def _items(source, condition, resolution: int, seed: int) -> tuple[Iterator[dict[str, Any]], str, int | None]:
    """The items training would read, how their condition seeds were derived, and their number if known."""
    from condistill.data.dataset import ConditionDataset
    from condistill.data.streaming import StreamingConditionDataset, is_streaming

    if is_streaming(source):
        stream = StreamingConditionDataset(source, condition, resolution, seed, batch_size=1, shuffle_buffer=1)
        return stream.source_items(), "item_seed(seed, '<shard file name>::<key>') (streamed source)", None
    dataset = ConditionDataset(source, condition, resolution, seed)
    return (dataset[i] for i in range(len(dataset))), "derive_seed(seed, index) (random-access source)", len(dataset)


def _remove_stale_partials(out: Path, log: Callable[[str], Any]) -> None:
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(folder.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            log(f"removed {folder}, left by a cache run that stopped")
        except (ValueError, PermissionError):
            continue


def write_cache(out: str | os.PathLike, *, base, condition, source, seed: int = 0, batch_size: int = 16,
                shard_size: int = 256, dtype: str = "float16", overwrite: bool = False, data_spec: str = "",
                data_options: dict[str, Any] | None = None, log: Callable[[str], Any] = print) -> Path:
    """Write the latent cache of ``source`` (opened at the run's resolution) for ``base`` and ``condition``.

    Args:
        out: the cache folder to create.
        base: a loaded :class:`~condistill.frozen.Base` (on the device to encode with).
        condition: the run's condition; source: the run's data source; seed: the run's seed.
        batch_size: images encoded by the VAE at once.
        shard_size: items per safetensors shard (one shard is held in memory while written).
        dtype: ``"float16"`` or ``"float32"``, storage of latents, embeddings and inexact conditions.
        overwrite: replace an existing cache at ``out`` (only once the new one is complete).
        data_spec: the ``--data`` text, recorded for messages and fingerprinted (with ``data_options``,
            the options ``source`` was opened with) so that opening the cache names a change of its data.
            Without it the cache records that its source is not known, and nothing is compared.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false, or it is not a cache.
        ValueError: the base gave non-finite latents or embeddings (nothing is written).
    """
    out = Path(out)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, got {value!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
        if not (is_cache(out) or cache_folder_problem(out) or out.is_dir() and not any(out.iterdir())):
            raise FileExistsError(f"{out} exists and is not a condistill cache; not replacing it (choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out, log)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    if data_spec:  # before the first item is read: a change during the build shows at the next open
        source_record = source_fingerprint(data_spec, data_options)
    else:
        source_record = {"kind": "object", "spec": source.name, "options": {},
                         "unavailable": "the cache was written from a source object, not a --data spec"}
    resolution = source.resolution
    items, seed_rule, total = _items(source, condition, resolution, seed)
    writer = _ShardWriter(partial, DTYPES[dtype])
    count, started, batch = 0, time.perf_counter(), []

    def encode_batch() -> None:
        pixels = torch.stack([item["pixel_values"] for item in batch])
        latents = base.encode_images(pixels.to(base.device, base.dtype)).float().cpu()
        bad = [item["key"] for item, latent in zip(batch, latents) if not bool(torch.isfinite(latent).all())]
        if bad:
            raise ValueError(f"the base's VAE gave non-finite latents (NaN or inf) for item(s) {', '.join(map(repr, bad[:3]))}"
                             f" (VAE dtype {base.dtype}); a cache of them would make training diverge, so nothing was cached")
        for item, latent in zip(batch, latents):
            writer.add(latent, item["conditioning"], item["caption"], item["key"], base.encode_prompts)
            if len(writer.items) >= shard_size:
                writer.flush()
                log(f"cache: {sum(shard['items'] for shard in writer.shards)} items written")
        batch.clear()

    try:
        with torch.no_grad():
            for item in items:
                batch.append(item)
                count += 1
                if len(batch) == batch_size:
                    encode_batch()
            if batch:
                encode_batch()
            writer.flush()
    except Exception:  # an error ends the build: nothing of it stays (a killed run's folder goes at the next run)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if count == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"{data_spec or source.name} gave no usable item; nothing to cache")
    index = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "items": count, "shards": writer.shards,
        "base": {"name_or_path": base.name_or_path, "fingerprint": base.fingerprint(),
                 "encoders_digest": encoders_digest(base.name_or_path)},
        "resolution": resolution,
        "condition": {"name": condition.name, "config": condition.config(), "channels": condition.channels},
        "seed": seed, "item_seeds": seed_rule, "data": data_spec or source.name,
        "data_options": jsonable(dict(data_options or {})), "source": source_record,
        "storage": {"dtype": dtype, "latents": dtype, "prompt_embeds": dtype,
                    "prompt_names": writer.prompt_names if writer.prompt_names is not False else None,
                    "conditioning": {"uint8": writer.uint8_conditions, dtype: writer.float_conditions}},
        "seconds": round(time.perf_counter() - started, 3),
        "complete": True,
    }
    if getattr(source, "stats", None) is not None:
        write_report(partial / REPORT_NAME, source.stats.report())
    (partial / INDEX_NAME).write_text(json.dumps(jsonable(index), indent=2) + "\n", encoding="utf-8")
    set_shared_mode(partial)  # 0644 shards under umask 022 (safetensors writes 0600): a shared cache is readable
    if out.exists():  # --overwrite: the old cache goes only now that the new one is complete
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)
    log(f"cache: {count} items in {len(writer.shards)} shard(s) written to {out}"
        + (f" (of {total} items)" if total is not None and total != count else ""))
    return out


def cache_command(*, condition: str, data: str, out: str, base: str, resolution: int = 0, batch_size: int = 16,
                  device: str = "cpu", seed: int = 0, condition_options: dict | None = None,
                  data_options: dict | None = None, dtype: str = "float16", shard_size: int = 256,
                  overwrite: bool = False, log: Callable[[str], Any] = print) -> Path:
    """``condistill cache``: open the base, the condition and the data as a training run would, then :func:`write_cache`."""
    from condistill.conditions import get_condition
    from condistill.config import check_resolution
    from condistill.data.sources import open_source
    from condistill.frozen import load_base

    if Path(out).exists() and not overwrite:  # before any model loads
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    resolution = check_resolution(base, resolution)
    cond = get_condition(condition, **(condition_options or {}))
    source = open_source(data, resolution=resolution, conditioning=cond.record_conditioning, **(data_options or {}))
    loaded = load_base(base, device=device)
    return write_cache(out, base=loaded, condition=cond, source=source, seed=seed, batch_size=batch_size,
                       shard_size=shard_size, dtype=dtype, overwrite=overwrite, data_spec=data,
                       data_options=data_options, log=log)
