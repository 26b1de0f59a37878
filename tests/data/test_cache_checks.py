"""The latent cache trusts nothing blindly: damage is refused in one line, a changed source is named, old caches
still read (with one line). The fingerprints themselves: tests/data/test_fingerprint.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from condistill.conditions import get_condition
from condistill.data import open_source
from condistill.data.cache import CacheDamagedError, CachedDataset, is_cache, verify_cache
from condistill.data.cache_writer import write_cache
from condistill.files import sha256_file

DATA, SEED = "synthetic:train:8", 3


def quiet(message: str) -> None:
    """A log that keeps nothing."""


@pytest.fixture(scope="module")
def built(sr_cache_of, tmp_path_factory) -> Path:
    """A cache of 8 synthetic items in shards of 3, 3 and 2."""
    return sr_cache_of(tmp_path_factory.mktemp("cache") / "sr", DATA, SEED, shard_size=3)


def _copy(cache: Path, to: Path) -> Path:
    shutil.copytree(cache, to)
    return to


def _edit_index(cache: Path, edit) -> None:
    index = json.loads((cache / "index.json").read_text())
    edit(index)
    (cache / "index.json").write_text(json.dumps(index))


def _flip(shard: Path, offset: int) -> None:
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))


def _rewrite(cache: Path, name: str, change) -> None:
    """Rewrite a shard's tensors through ``change(key, tensor)``, and its index entry to match (what a faulty writer
    would leave: a hash that fits the bad content)."""
    with safe_open(str(cache / name), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: change(k, handle.get_tensor(k)) for k in handle.keys()}
    save_file(tensors, str(cache / name), metadata=metadata)

    def edit(index):
        shard = next(s for s in index["shards"] if s["file"] == name)
        shard["bytes"], shard["sha256"] = (cache / name).stat().st_size, sha256_file(cache / name)
    _edit_index(cache, edit)


def _refused(call, *shards: str) -> str:
    with pytest.raises(CacheDamagedError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "cache" in message and "Traceback" not in message, message
    assert all(shard in message for shard in shards), message
    assert "condistill cache --condition sr --data synthetic:train:8" in message and "--overwrite" in message
    return message


# ------------------------------------------------------------------------------------------ damage


def test_bytes_scrambled_at_the_same_size_are_refused_when_the_shard_is_first_read(built, tmp_path):
    cache = _copy(built, tmp_path / "c")
    shard = cache / "shard-00001.safetensors"
    _flip(shard, shard.stat().st_size - 40)  # a tensor byte: the header still reads
    cached = CachedDataset(cache, log=quiet)  # opening reads no shard
    assert cached[0]["key"] and is_cache(cache)
    assert "SHA-256" in _refused(lambda: cached[4], "shard-00001.safetensors")
    _refused(lambda: verify_cache(cache, log=quiet), "shard-00001.safetensors")


def test_non_finite_latents_are_refused_as_damage_not_blamed_on_the_learning_rate(base, built, tmp_path):
    from helpers import tiny_run_config

    from condistill.training.loop import distill

    cache = _copy(built, tmp_path / "c")
    _rewrite(cache, "shard-00000.safetensors",
             lambda key, t: torch.full_like(t, float("nan")) if key.startswith("latents.") else t)
    assert "non-finite" in _refused(lambda: CachedDataset(cache, log=quiet)[0], "shard-00000.safetensors")
    with pytest.raises(CacheDamagedError, match="shard-00000.safetensors holds non-finite values"):
        distill(tiny_run_config(base.name_or_path, tmp_path / "run", condition="sr", data=str(cache), seed=SEED))


def test_a_shard_cut_short_or_with_a_damaged_header_is_refused_in_one_line(built, tmp_path):
    cut = _copy(built, tmp_path / "cut")
    shard = cut / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert is_cache(cut)  # so a run reads it as a cache, and is told what is wrong, not datasets' traceback
    assert "bytes where the index recorded" in _refused(lambda: CachedDataset(cut), "shard-00002.safetensors")
    (cut / "shard-00001.safetensors").unlink()
    _refused(lambda: CachedDataset(cut), "shard-00001.safetensors is missing", "shard-00002.safetensors")

    header = _copy(built, tmp_path / "header")
    for offset in range(8, 16):  # the JSON header's first bytes
        _flip(header / "shard-00001.safetensors", offset)
    _refused(lambda: CachedDataset(header, log=quiet)[3], "shard-00001.safetensors")
    _edit_index(header, lambda index: [s.pop("sha256") for s in index["shards"]])  # no hash: the header is read
    assert "cannot be read as a shard" in _refused(lambda: CachedDataset(header, log=quiet)[3], "shard-00001")


def test_a_damaged_shard_read_by_a_dataloader_worker_is_still_one_line(built, tmp_path):
    cache = _copy(built, tmp_path / "c")
    _flip(cache / "shard-00002.safetensors", (cache / "shard-00002.safetensors").stat().st_size - 40)
    cached = CachedDataset(cache, log=quiet)
    loader = DataLoader(cached, batch_size=1, sampler=[0, 7], collate_fn=cached.collate, num_workers=1)
    _refused(lambda: list(loader), "shard-00002.safetensors")


def test_verify_cache_names_every_damaged_shard_in_one_error(built, tmp_path):
    lines: list[str] = []
    verify_cache(built, log=lines.append)
    assert lines == [f"cache {built}: 3 shard(s), 8 items verified (content hashes, sizes, headers, items, finite values)"]
    cache = _copy(built, tmp_path / "c")
    _flip(cache / "shard-00000.safetensors", 300)
    (cache / "shard-00002.safetensors").write_bytes(b"")
    lines.clear()
    _refused(lambda: verify_cache(cache, log=lines.append), "shard-00000.safetensors", "shard-00002.safetensors")
    assert len(lines) == 2 and all(line.startswith("cache: shard-0000") for line in lines)
    (cache / "index.json").write_text('{"format": "condistill-latent-cache", "complete": tr')
    with pytest.raises(CacheDamagedError, match="index.json cannot be read"):
        verify_cache(cache, log=quiet)
    with pytest.raises(CacheDamagedError, match="looks like a latent cache"):  # what a run gets from `--data`
        open_source(str(cache))
    with pytest.raises(ValueError, match="is a latent cache"):
        open_source(str(built))


def test_non_finite_latents_are_not_written(base, tmp_path, monkeypatch):
    real = base.encode_images
    monkeypatch.setattr(base, "encode_images", lambda pixels: real(pixels) * float("nan"))
    with pytest.raises(ValueError, match="non-finite latents"):
        write_cache(tmp_path / "c", base=base, condition=get_condition("sr"), seed=SEED,
                    source=open_source("synthetic:train:2", resolution=base.resolution), log=quiet)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its partial folder


# ------------------------------------------------------------------------------------------ the source


def _images(folder: Path, names, size: int = 64) -> None:
    folder.mkdir(exist_ok=True)
    for n in names:
        Image.new("RGB", (size, size), (7 * n % 256, 90, 40)).save(folder / f"{n:02d}.png")


def test_a_changed_image_folder_is_named_when_the_cache_is_opened(base, tmp_path):
    folder = tmp_path / "images"
    _images(folder, range(16))
    cache = write_cache(tmp_path / "cache", base=base, condition=get_condition("sr"), seed=SEED, shard_size=8,
                        source=open_source(str(folder), resolution=base.resolution), data_spec=str(folder), log=quiet)
    said: list[str] = []
    assert CachedDataset(cache, log=said.append).source_change is None and said == []
    _images(folder, range(16, 20))
    (folder / "03.png").unlink()
    (folder / "05.png").write_bytes(b"not the image it was")
    said = []
    cached = CachedDataset(cache, log=said.append)
    assert len(said) == 1 and "\n" not in said[0]
    assert "4 files added (16.png, 17.png, 18.png, ...), 1 removed (03.png), 1 changed (05.png)" in said[0]
    assert "training on the cache as it was built" in said[0] and "condistill cache --condition sr" in said[0]
    assert cached.source_change in said[0] and len(cached) == 16 and cached[15]["key"] == "15.png"
    CachedDataset(cache, log=said.append)  # opened again (the loop's validation batch): nothing new said
    assert len(said) == 1
    shutil.rmtree(folder)
    gone: list[str] = []
    CachedDataset(cache, log=gone.append)
    assert len(gone) == 1 and f"{folder} no longer exists (it held 16 files)" in gone[0]


def test_an_unreachable_hub_source_is_said_in_one_line_and_reading_goes_on(built, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    cache = _copy(built, tmp_path / "c")
    recorded = {"kind": "hub", "spec": "someone/toy", "options": {}, "sha": "abc", "count": 0, "bytes": 0,
                "digest": "d", "files": {}}
    _edit_index(cache, lambda index: index.update(source=recorded))

    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")
    monkeypatch.setattr(HfApi, "dataset_info", offline)
    said: list[str] = []
    cached = CachedDataset(cache, log=said.append)
    assert len(said) == 1 and "was not checked" in said[0] and "OfflineModeIsEnabled" in said[0]
    assert len(cached) == 8


def test_a_cache_written_before_hashes_reads_with_one_warning(built, tmp_path):
    cache = _copy(built, tmp_path / "c")

    def old(index):
        for key in ("source", "data_options"):
            index.pop(key)
        for shard in index["shards"]:
            shard.pop("sha256")
    _edit_index(cache, old)
    said: list[str] = []
    cached = CachedDataset(cache, log=said.append)
    assert len(said) == 1 and "written before caches recorded content hashes" in said[0]
    assert torch.isfinite(cached[7]["latents"]).all()
    verify_cache(cache, log=said.append)
    assert said[-1].endswith("items verified (no content hashes recorded; sizes, headers, items, finite values)")
    _rewrite(cache, "shard-00001.safetensors",
             lambda key, t: torch.full_like(t, float("inf")) if key == "latents.1" else t)
    _edit_index(cache, lambda index: [s.pop("sha256") for s in index["shards"] if "sha256" in s])
    _refused(lambda: CachedDataset(cache, log=quiet)[4], "shard-00001.safetensors holds non-finite values")


def test_verify_cache_refuses_an_item_count_its_shards_do_not_hold(built, tmp_path):
    cache = _copy(built, tmp_path / "c")
    _edit_index(cache, lambda index: index.update(items=40))
    with pytest.raises(CacheDamagedError, match="says 40 items but its shards hold 8"):
        verify_cache(cache, log=quiet)
