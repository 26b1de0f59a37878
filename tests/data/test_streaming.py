"""StreamingConditionDataset: coverage per epoch across ranks and workers, determinism, exact resume,
no records held, unusable samples, streamed ``datasets``."""
from __future__ import annotations

import io
import logging
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from source_helpers import encode  # noqa: E402

from condistill.conditions import get_condition  # noqa: E402
from condistill.data import EmptySourceError, Record, RecordSequenceSource, WebDatasetSource, open_source  # noqa: E402
from condistill.data.report import SkipMonitor  # noqa: E402
from condistill.data.streaming import StreamingConditionDataset, batches_before, is_streaming, item_seed  # noqa: E402

RES = 16


def noise_png(n: int, size: int = RES) -> bytes:
    rng = np.random.default_rng(n)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB"))


def write_shards(folder: Path, shards: int, per_shard: int, bad: tuple[int, ...] = (), size: int = RES) -> str:
    """``shards`` tar files of ``per_shard`` samples ``k0000, k0001, ...``; samples in ``bad`` are corrupt."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in range(shards):
        with tarfile.open(folder / f"s-{s:02d}.tar", "w") as tar:
            for _ in range(per_shard):
                image = b"not an image" if n in bad else noise_png(n, size)
                for ext, data in (("png", image), ("txt", f"caption {n}".encode())):
                    info = tarfile.TarInfo(f"k{n:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    return str(folder / f"s-{{00..{shards - 1:02d}}}.tar")


def dataset(spec: str, **kwargs) -> StreamingConditionDataset:
    options = {"batch_size": 4, "shuffle_buffer": 6, **kwargs}
    return StreamingConditionDataset(WebDatasetSource(spec, RES), get_condition("sr"), RES, options.pop("seed", 3),
                                     **options)


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("shards", [8, 2])  # 2 shards < 4 streams: split by sample position
def test_every_item_once_per_epoch_across_ranks_and_workers(tmp_path: Path, shards: int, caplog):
    spec = write_shards(tmp_path, shards, 16 // shards * 2)  # 32 samples
    per_stream = 32 // 4
    seen = []
    with caplog.at_level(logging.INFO, logger="condistill.data.streaming"):
        for rank in range(2):
            ds = dataset(spec, rank=rank, world_size=2)
            for worker in range(2):
                epochs = [item["key"] for item in take(ds.stream_items(worker, 2), 2 * per_stream)]
                first, second = epochs[:per_stream], epochs[per_stream:]
                assert len(set(first)) == per_stream and len(set(second)) == per_stream
                seen += first
    assert sorted(seen) == [f"k{n:04d}" for n in range(32)]
    assert ("every stream reads every shard" in caplog.text) == (shards == 2)


def test_same_seed_same_stream_other_seed_other_order(tmp_path: Path):
    spec = write_shards(tmp_path, 4, 5)
    a, b = take(iter(dataset(spec)), 12), take(iter(dataset(spec)), 12)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["conditioning"], y["conditioning"]) and torch.equal(x["pixel_values"], y["pixel_values"])
               for x, y in zip(a, b))
    other = take(iter(dataset(spec, seed=4)), 12)
    assert [x["key"] for x in other] != [x["key"] for x in a]
    # the condition of a sample depends on the seed and the sample, not on where the stream put it
    by_key = {x["key"]: x["conditioning"] for x in a}
    in_order = [x for x in take(iter(dataset(spec, shuffle_buffer=1)), 20) if x["key"] in by_key]
    assert len(in_order) == len(by_key) and all(torch.equal(by_key[x["key"]], x["conditioning"]) for x in in_order)
    assert item_seed(3, "s-00.tar::k0000") != item_seed(3, "s-00.tar::k0001")


def test_batches_before_follows_the_loaders_round_robin():
    for workers in (1, 2, 3):
        for start in range(8):
            produced = [sum(1 for m in range(start) if m % workers == role) for role in range(workers)]
            assert [batches_before(start, role, workers) for role in range(workers)] == produced


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_micro_step_equals_the_uninterrupted_stream(tmp_path: Path, num_workers: int):
    spec = write_shards(tmp_path, 4, 3, bad=(4,))  # 12 samples, each stream's epoch is short: resume crosses epochs
    def batches(start: int, count: int) -> list[dict]:
        ds = dataset(spec, start_micro_step=start)
        loader = DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=ds.collate)
        return take(iter(loader), count)

    full = batches(0, 12)
    for start in (5, 9):
        resumed = batches(start, 12 - start)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[start:]]
        assert all(torch.equal(r["conditioning"], f["conditioning"]) for r, f in zip(resumed, full[start:]))


def test_holds_no_records_whatever_the_number_of_shards(tmp_path: Path):
    sizes = []
    for shards in (1, 8):
        ds = dataset(write_shards(tmp_path / str(shards), shards, 32 // shards, size=48), shuffle_buffer=4)
        before = len(pickle.dumps(ds))
        take(iter(ds), 96)  # three epochs of 48x48 noise images (about 7 kB each encoded)
        sizes.append(len(pickle.dumps(ds)) - before)
        assert not any(isinstance(v, (list, tuple)) and v and isinstance(v[0], (Record, dict)) for v in vars(ds).values())
    # what grows is the skip bookkeeping (one key per sample seen), not 32 encoded images (over 200 kB)
    assert max(sizes) < 8_000 and abs(sizes[0] - sizes[1]) < 2_000


def test_unusable_samples_are_counted_and_replaced_by_the_next_usable_one(tmp_path: Path):
    spec = write_shards(tmp_path, 1, 6, bad=(1, 2))
    ds = dataset(spec, shuffle_buffer=1)  # read order
    monitor = SkipMonitor.for_dataset(ds, max_skip_fraction=1.0, log=lambda message: None)
    batch = monitor.update(ds.collate(take(iter(ds), 6)))
    assert batch["key"] == ["k0000", "k0003", "k0003", "k0003", "k0004", "k0005"]
    assert monitor.stats.skipped == {"corrupt": 2} and monitor.stats.seen == 6 and monitor.total is None


def test_a_stream_without_usable_samples_stops(tmp_path: Path):
    ds = dataset(write_shards(tmp_path, 1, 3, bad=(0, 1, 2)))
    with pytest.raises(EmptySourceError, match="all 3 items were skipped"):
        next(iter(ds))


def test_too_few_samples_for_the_streams_is_refused(tmp_path: Path):
    ds = dataset(write_shards(tmp_path, 1, 2), world_size=3, rank=2)
    with pytest.raises(ValueError, match="fewer than the 3 streams"):
        next(iter(ds))


class Reiterable:
    def __init__(self, records):
        self.records = records

    def __iter__(self):
        return iter(self.records)


def test_plain_iterables_and_what_streams():
    records = [Record(image=Image.new("RGB", (24, 20), (i, 0, 0)), caption=str(i)) for i in range(6)]
    ds = StreamingConditionDataset(Reiterable(records), get_condition("sr"), RES, 0, batch_size=2, shuffle_buffer=1)
    items = take(iter(ds), 7)
    assert [x["caption"] for x in items] == ["0", "1", "2", "3", "4", "5", "0"]
    assert items[0]["key"] == "#0" and items[0]["pixel_values"].shape == (3, RES, RES)
    with pytest.raises(TypeError, match="one-shot iterator"):
        StreamingConditionDataset((r for r in records), get_condition("sr"), RES, 0, batch_size=2)
    with pytest.raises(TypeError, match="random access"):
        StreamingConditionDataset(records, get_condition("sr"), RES, 0, batch_size=2)
    assert is_streaming(Reiterable(records)) and not is_streaming(records)
    assert not is_streaming(RecordSequenceSource(records, RES))


def test_streamed_parquet_files_split_by_shard(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "parquet"
    folder.mkdir()
    for part in range(3):
        rows = {"image": [{"bytes": noise_png(part * 4 + i), "path": None} for i in range(4)],
                "text": [f"row {part}-{i}" for i in range(4)]}
        datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(folder / f"p{part}.parquet")
    source = open_source(folder, resolution=RES, streaming=True)
    assert is_streaming(source) and len(source.shards) == 3
    ds = StreamingConditionDataset(source, get_condition("sr"), RES, 0, batch_size=2, shuffle_buffer=3)
    keys = [x["key"] for w in range(3) for x in take(ds.stream_items(w, 3), 4)]  # one epoch of each stream
    assert sorted(keys) == sorted(f"{p}/{i}" for p in range(3) for i in range(4))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [{"bytes": noise_png(0), "path": None}], "text": ["x"]}).save_to_disk(saved)
    with pytest.raises(ValueError, match="memory-mapped"):
        open_source(saved, resolution=RES, streaming=True)
