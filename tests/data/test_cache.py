"""The latent cache: equal to the live path, refused for other settings, never read when partial, the CLI.

Damage, a changed source and old caches: tests/data/test_cache_checks.py."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from condistill.cli import main
from condistill.conditions import get_condition
from condistill.data import ConditionDataset, open_source
from condistill.data.cache import CacheDamagedError, CacheMismatchError, CachedDataset, is_cache
from condistill.data.cache_writer import encoders_digest, write_cache
from condistill.data.report import SkipMonitor
from condistill.data.streaming import StreamingConditionDataset

BASE = "embedded:tiny-teacher"
DATA = "synthetic:train:16"
SEED = 5
quiet = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def sr_cache(sr_cache_of, tmp_path_factory) -> Path:
    return sr_cache_of(tmp_path_factory.mktemp("cache") / "sr", DATA, SEED, batch_size=5, shard_size=6)


def test_cached_items_equal_the_live_path(base, sr_cache: Path):
    cached = CachedDataset(sr_cache)
    live = ConditionDataset(open_source(DATA, resolution=base.resolution), get_condition("sr"), seed=SEED)
    assert len(cached) == len(live) == 16 and len(cached.index["shards"]) == 3
    assert cached.index["storage"]["conditioning"] == {"uint8": 16, "float16": 0}
    for i in (0, 7, 15):
        item, want = cached[i], live[i]
        latents = base.encode_images(want["pixel_values"][None])[0]
        embeds = base.encode_prompts([want["caption"]])[0]
        assert item["latents"].dtype == torch.float32 and item["latents"].shape == latents.shape
        torch.testing.assert_close(item["latents"], latents, rtol=1e-3, atol=2e-3)  # float16 storage
        torch.testing.assert_close(item["prompt_embeds"], embeds, rtol=1e-3, atol=2e-3)
        assert torch.equal(item["conditioning"], want["conditioning"])  # sr is exact in uint8
        assert (item["caption"], item["key"]) == (want["caption"], want["key"])
    batch = cached.collate([cached[0], cached[1], cached[2]])
    assert batch["latents"].shape[0] == 3 and batch["prompt_embeds"].shape[:1] == (3,)
    assert batch["conditioning"].shape == (3, 3, base.resolution, base.resolution) and len(batch["key"]) == 3
    copy = pickle.loads(pickle.dumps(cached))  # what a DataLoader worker gets: no open file handle
    assert torch.equal(copy[3]["latents"], cached[3]["latents"])
    monitor = SkipMonitor.for_dataset(cached, log=quiet)
    monitor.update(cached.collate([cached[4]]))
    assert monitor.total == 16 and monitor.stats.seen >= 1 and not monitor.stats.skipped


def test_cache_files_are_readable_by_others(sr_cache_of, tmp_path: Path):
    import os

    old = os.umask(0o022)
    try:
        cache = sr_cache_of(tmp_path / "c", "synthetic:train:4", SEED, batch_size=4, shard_size=4)
    finally:
        os.umask(old)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_float_conditions_and_float32_storage(base, tmp_path: Path):
    source = open_source("synthetic:train:4", resolution=base.resolution)
    out = write_cache(tmp_path / "depth", base=base, condition=get_condition("depth"), source=source, seed=SEED,
                      dtype="float32", log=quiet)
    cached = CachedDataset(out)
    live = ConditionDataset(open_source("synthetic:train:4", resolution=base.resolution), get_condition("depth"),
                            seed=SEED)
    assert cached.index["storage"]["conditioning"]["float32"] == 4
    torch.testing.assert_close(cached[2]["conditioning"], live[2]["conditioning"], rtol=0, atol=0)
    torch.testing.assert_close(cached[2]["latents"], base.encode_images(live[2]["pixel_values"][None])[0])


def test_a_streamed_source_is_cached_with_the_streams_conditions(base, tmp_path: Path):
    from PIL import Image

    shard = tmp_path / "s-00.tar"
    with tarfile.open(shard, "w") as tar:
        for n in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (base.resolution, base.resolution), (40 * n, 90, 10)).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", f"scene {n}".encode())):
                info = tarfile.TarInfo(f"k{n}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = write_cache(tmp_path / "c", base=base, condition=get_condition("inpaint"),
                      source=open_source(str(shard), resolution=base.resolution), seed=SEED, log=quiet)
    stream = StreamingConditionDataset(open_source(str(shard), resolution=base.resolution), get_condition("inpaint"),
                                       None, SEED, batch_size=1)
    want = {item["key"]: item["conditioning"] for item in stream.source_items()}
    cached = CachedDataset(out)
    assert "item_seed" in cached.index["item_seeds"] and sorted(want) == ["k0", "k1", "k2"]
    assert all(torch.equal(cached[i]["conditioning"], want[cached[i]["key"]]) for i in range(3))


def test_other_settings_are_refused_naming_what_differs(base, sr_cache: Path):
    cached = CachedDataset(sr_cache)
    condition = get_condition("sr")
    args = dict(base_fingerprint=base.fingerprint(), resolution=base.resolution, condition_name="sr",
                condition_config=condition.config(), seed=SEED)
    cached.check(**args, encoders_digest=encoders_digest(BASE))  # the run's own settings pass
    changes = {
        "base_fingerprint": ({**base.fingerprint(), "cross_attention_dim": 768}, "base cross_attention_dim"),
        "resolution": (32, "resolution 64 != 32"),
        "condition_name": ("edge", "condition 'sr' != 'edge'"),
        "condition_config": (get_condition("sr", scales=(4,)).config(), "condition config"),
        "seed": (6, f"seed {SEED} != 6"),
    }
    for name, (value, words) in changes.items():
        with pytest.raises(CacheMismatchError, match="condistill cache") as info:
            cached.check(**{**args, name: value})
        assert words in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(CacheMismatchError, match="VAE/text-encoder weights differ"):
        cached.check(**args, encoders_digest="0" * 64)


def test_a_stopped_or_damaged_cache_is_not_complete(base, tmp_path: Path, sr_cache: Path):
    class Breaks:
        name, channels = "sr", 3

        def __init__(self):
            self.calls, self.inner = 0, get_condition("sr")

        def __call__(self, record, seed):
            self.calls += 1
            if self.calls > 8:
                raise KeyboardInterrupt  # what a killed run looks like from here
            return self.inner(record, seed)

        def config(self):
            return self.inner.config()

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        write_cache(out, base=base, condition=Breaks(), source=open_source(DATA, resolution=base.resolution),
                    batch_size=2, shard_size=4, log=quiet)
    partials = list(tmp_path.glob(".stopped.partial-*"))
    assert not out.exists() and len(partials) == 1 and not is_cache(partials[0])
    assert len(list(partials[0].glob("shard-*.safetensors"))) == 2  # shards written before the stop, no index
    with pytest.raises(ValueError, match="not a complete condistill latent cache"):
        CachedDataset(partials[0])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in sr_cache.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    assert is_cache(damaged)
    index = json.loads((sr_cache / "index.json").read_text())
    (damaged / "index.json").write_text(json.dumps({**index, "complete": False}))
    assert not is_cache(damaged)  # a shard cut short is the cache's damage: tests/data/test_cache_checks.py
    with pytest.raises(CacheDamagedError, match="does not say it is complete"):
        CachedDataset(damaged)


def test_the_cli_writes_a_cache_and_refuses_to_overwrite(tmp_path: Path, capsys):
    out = tmp_path / "c"
    argv = ["cache", "--condition", "inpaint", "--data", "synthetic:train:3", "--out", str(out), "--seed", "2",
            "--shard-size", "2"]
    assert main(argv) == 0 and is_cache(out)
    assert CachedDataset(out).seed == 2 and len(CachedDataset(out)) == 3
    before = (out / "index.json").read_text()
    assert main(argv) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and (out / "index.json").read_text() == before
    assert main(argv + ["--overwrite", "--seed", "3"]) == 0 and CachedDataset(out).seed == 3
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(argv[:6] + [str(other), "--overwrite"]) == 1
    assert "is not a condistill cache" in capsys.readouterr().err and (other / "notes.txt").exists()
