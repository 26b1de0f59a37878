"""Data sources: record schema, image sanitising, bad inputs and their counts."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from condistill.data import (
    EmptySourceError,
    HFDatasetSource,
    ImageFolderSource,
    ImageSanitizer,
    Record,
    SyntheticSource,
    WebDatasetSource,
    expand_braces,
    open_source,
    to_rgb,
)
from condistill.data.images import SkipItem, SourceStats, crop_box, open_image

RES = 32


# ----------------------------------------------------------------------------- helpers


def rgb(w: int, h: int, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def check_record(record: Record, res: int = RES) -> None:
    assert isinstance(record, Record)
    assert record.image.mode == "RGB"
    assert record.image.size == (res, res)
    assert isinstance(record.caption, str)
    assert isinstance(record.key, str) and record.key
    if record.conditioning is not None:
        assert record.conditioning.mode == "RGB" and record.conditioning.size == (res, res)
    if record.depth is not None:
        assert record.depth.dtype == np.float32 and record.depth.shape == (res, res)
        assert 0.0 <= record.depth.min() and record.depth.max() <= 1.0


# --------------------------------------------------------------------- image helpers


def test_to_rgb_converts_every_mode_and_names_it():
    cases = {
        "grayscale": Image.new("L", (4, 4), 100),
        "rgba": Image.new("RGBA", (4, 4), (255, 0, 0, 0)),
        "grayscale_alpha": Image.new("LA", (4, 4), (0, 0)),
        "cmyk": Image.new("CMYK", (4, 4), (0, 255, 255, 0)),
        "16bit": Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16)),
        "float": Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)),
    }
    expected = {
        "grayscale": (100, 100, 100),
        "rgba": (255, 255, 255),  # fully transparent -> white background
        "grayscale_alpha": (255, 255, 255),
        "cmyk": (255, 0, 0),
        "16bit": (100, 100, 100),
        "float": (128, 128, 128),
    }
    for reason, image in cases.items():
        notes: list[str] = []
        out = to_rgb(image, notes)
        assert out.mode == "RGB", reason
        assert notes == [reason]
        assert out.getpixel((1, 1)) == expected[reason], reason


def test_to_rgb_composites_partial_alpha_on_white_and_keeps_rgb():
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    r, g, b = to_rgb(half).getpixel((0, 0))
    assert 125 <= r <= 129 and r == g == b
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([10, 20, 30] * 256)
    notes: list[str] = []
    assert to_rgb(palette, notes).getpixel((0, 0)) == (10, 20, 30) and notes == ["palette"]
    plain = rgb(3, 3)
    notes = []
    assert to_rgb(plain, notes) is plain and notes == []


def test_center_crop_keeps_the_middle_of_a_wide_image():
    # 200x100: red | green | blue in columns [0,50), [50,150), [150,200)
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50] = (255, 0, 0)
    arr[:, 50:150] = (0, 255, 0)
    arr[:, 150:] = (0, 0, 255)
    prepared = ImageSanitizer(RES).prepare(Image.fromarray(arr), "wide")
    out = np.asarray(prepared.image)
    assert out.shape == (RES, RES, 3)
    assert (out[:, 2:-2, 1] > 200).all() and (out[:, 2:-2, 0] < 50).all()
    assert prepared.box == pytest.approx((50.0, 0.0, 150.0, 100.0))
    # a tall image: the box spans the full width and the vertical middle
    assert crop_box((60, 120), 30) == pytest.approx((0.0, 30.0, 60.0, 90.0))


def test_random_crop_is_deterministic_per_seed_and_key():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 160, 3), dtype=np.uint8))
    boxes = {seed: ImageSanitizer(RES, crop="random", seed=seed).prepare(image, "k").box for seed in range(8)}
    again = ImageSanitizer(RES, crop="random", seed=3).prepare(image, "k")
    assert again.box == boxes[3]
    assert len(set(boxes.values())) > 1
    for box in boxes.values():
        assert box[0] >= 0 and box[2] <= 160 and box[2] - box[0] == pytest.approx(40)


def test_sanitizer_skips_small_corrupt_and_truncated_and_rejects_bad_options(tmp_path):
    sanitizer = ImageSanitizer(64)  # min_size 32
    with pytest.raises(SkipItem) as info:
        sanitizer.prepare(rgb(20, 50), "small")
    assert info.value.reason == "too_small"
    prepared = sanitizer.prepare(rgb(40, 40), "upscaled")
    assert prepared.image.size == (64, 64) and "upscaled" in prepared.conversions
    with pytest.raises(SkipItem) as info:
        open_image(b"definitely not an image")
    assert info.value.reason == "corrupt"
    jpeg = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(SkipItem) as info:
        open_image(jpeg[: len(jpeg) // 2])
    assert info.value.reason == "truncated"
    with pytest.raises(SkipItem) as info:
        open_image(tmp_path / "missing.png")
    assert info.value.reason == "missing_file"
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageSanitizer(64, crop="middle")
    with pytest.raises(ValueError, match="resolution must be a positive int"):
        ImageSanitizer(0)


def test_large_jpeg_is_drafted_but_still_correct():
    arr = np.zeros((800, 1200, 3), np.uint8)
    arr[:, :, 2] = 255
    out = ImageSanitizer(RES).prepare(encode(Image.fromarray(arr), "JPEG"), "big")
    assert out.image.size == (RES, RES)
    assert np.asarray(out.image)[..., 2].min() > 240


def test_source_stats_counts_each_key_once_and_summarises():
    stats = SourceStats(name="demo")
    stats.observe("a", ["rgba"])
    stats.observe("a", ["rgba"])  # a second epoch does not double count
    stats.observe("b", skipped=SkipItem("corrupt", "bad header"))
    assert (stats.seen, stats.yielded) == (2, 1)
    assert stats.converted["rgba"] == 1 and stats.skipped["corrupt"] == 1
    text = stats.summary()
    assert "1 of 2 items used" in text and "rgba=1" in text and "corrupt=1" in text and "b: bad header" in text


# ---------------------------------------------------------------------- image folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "cond").mkdir()
    rgb(48, 40).save(root / "a.png")
    (root / "a.txt").write_text("a red square\n", encoding="utf-8")
    rgb(40, 40, (0, 0, 200)).save(root / "sub" / "b.jpg")
    Image.new("L", (40, 40), 90).save(root / "gray.png")
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(root / "alpha.png")
    Image.fromarray(np.full((40, 40), 60000, np.uint16)).save(root / "deep16.png")
    rgb(8, 8).save(root / "tiny.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    jpeg = encode(Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)), "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("RGB", (48, 40), (0, 255, 0)).save(root / "cond" / "a_edges.png")
    (root / ".hidden").mkdir()
    rgb(40, 40).save(root / ".hidden" / "ignored.png")
    rows = [
        {"file_name": "sub/b.jpg", "text": "a blue square", "score": 7},
        {"file_name": "a.png", "conditioning_file_name": "cond/a_edges.png"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return root


def test_image_folder_records_captions_conditioning_and_counts(image_folder: Path):
    source = ImageFolderSource(image_folder, RES)
    assert len(source) == 8  # conditioning image and hidden folder excluded
    records = {r.key: r for r in source}
    for record in records.values():
        check_record(record)
    assert sorted(records) == ["a.png", "alpha.png", "deep16.png", "gray.png", "sub/b.jpg"]
    assert records["a.png"].caption == "a red square"  # sidecar (metadata row has no text)
    assert records["sub/b.jpg"].caption == "a blue square"  # metadata.jsonl
    assert records["sub/b.jpg"].attributes["metadata"] == {"score": 7}
    assert records["gray.png"].caption == ""
    assert records["a.png"].conditioning.getpixel((5, 5)) == (0, 255, 0)
    assert records["alpha.png"].image.getpixel((3, 3)) == (255, 255, 255)
    assert records["deep16.png"].image.getpixel((3, 3)) == (233, 233, 233)
    stats = source.stats
    assert stats.skipped == {"corrupt": 1, "truncated": 1, "too_small": 1}
    assert stats.converted["grayscale"] == 1 and stats.converted["rgba"] == 1 and stats.converted["16bit"] == 1
    assert (stats.seen, stats.yielded) == (8, 5)
    assert "too_small=1" in stats.summary()
    # a second pass gives the same records and does not double count
    assert [r.key for r in source] == list(records)
    assert stats.seen == 8


def test_image_folder_random_access_returns_none_for_skipped(image_folder: Path):
    source = ImageFolderSource(image_folder, RES)
    keys = [source._key(i) for i in range(len(source))]
    assert source.load(keys.index("corrupt.png")) is None
    assert source.load(keys.index("a.png")).key == "a.png"
    with pytest.raises(IndexError):
        source.load(len(source))


def test_image_folder_caption_column_errors_and_choice(tmp_path: Path):
    rgb(40, 40).save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "caption": "hello"}) + "\n")
    with pytest.raises(KeyError) as info:
        ImageFolderSource(tmp_path, RES)
    assert "'caption'" in str(info.value) and "caption_column" in str(info.value)
    (record,) = list(ImageFolderSource(tmp_path, RES, caption_column="caption"))
    assert record.caption == "hello"
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png"}\n{broken\n')
    with pytest.raises(ValueError, match="line 2"):
        ImageFolderSource(tmp_path, RES)


def test_image_folder_empty_and_all_bad(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(tmp_path / "nope", RES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError, match="No image files"):
        ImageFolderSource(tmp_path / "empty", RES)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "one.png").write_bytes(b"junk")
    rgb(4, 4).save(bad / "two.png")
    source = ImageFolderSource(bad, RES)
    with pytest.raises(EmptySourceError) as info:
        list(source)
    message = str(info.value)
    assert "is empty" in message and "corrupt=1" in message and "too_small=1" in message and "min_size" in message


# ----------------------------------------------------------------------- HF datasets


def _hf_dataset(n: int = 3):
    import datasets

    images = [rgb(40 + 8 * i, 40) for i in range(n)]
    depth = [Image.fromarray(np.full((40, 40 + 8 * i), 128, np.uint8)) for i in range(n)]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "cond": datasets.Image(), "depth": datasets.Image()}
    )
    return datasets.Dataset.from_dict(
        {"image": images, "text": [f"caption {i}" for i in range(n)], "cond": images, "depth": depth}, features=features
    )


def test_hf_save_to_disk_records_depth_and_conditioning(tmp_path: Path):
    folder = tmp_path / "saved"
    _hf_dataset().save_to_disk(folder)
    source = open_source(str(folder), resolution=RES, conditioning_column="cond", depth_column="depth")
    assert isinstance(source, HFDatasetSource) and len(source) == 3
    records = list(source)
    for i, record in enumerate(records):
        check_record(record)
        assert record.caption == f"caption {i}" and record.key == str(i)
        assert record.depth == pytest.approx(np.full((RES, RES), 128 / 255, np.float32), abs=1e-4)
    no_captions = HFDatasetSource(folder, caption_column=None, resolution=RES)
    assert next(iter(no_captions)).caption == ""


def test_hf_missing_column_lists_available_columns(tmp_path: Path):
    folder = tmp_path / "saved"
    _hf_dataset(1).save_to_disk(folder)
    with pytest.raises(KeyError) as info:
        HFDatasetSource(folder, caption_column="caption", resolution=RES)
    message = str(info.value)
    assert "'caption'" in message and "['image', 'text', 'cond', 'depth']" in message and "caption_column" in message
    with pytest.raises(KeyError, match="image_column"):
        HFDatasetSource(folder, image_column="pixels", resolution=RES)


def test_hf_dataset_dict_split_and_bad_cells(tmp_path: Path):
    import datasets

    good = encode(rgb(40, 40))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    train = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": good, "path": None}, {"bytes": b"corrupt", "path": None}, {"bytes": encode(rgb(5, 5)), "path": None}],
            "text": ["ok", "bad", "small"],
        },
        features=features,
    )
    paths = tmp_path / "p.png"
    rgb(40, 40).save(paths)
    test = datasets.Dataset.from_dict({"image": [str(paths)], "text": ["from a path string"]})
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(folder)

    source = HFDatasetSource(folder, resolution=RES)
    assert [r.caption for r in source] == ["ok"]
    assert source.stats.skipped == {"corrupt": 1, "too_small": 1}
    (record,) = list(HFDatasetSource(folder, split="test", resolution=RES))
    check_record(record)
    assert record.caption == "from a path string"
    with pytest.raises(KeyError, match=r"available splits: \['test', 'train'\]"):
        HFDatasetSource(folder, split="validation", resolution=RES)


def test_hf_load_dataset_from_local_parquet_folder(tmp_path: Path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    _hf_dataset(2).to_parquet(str(folder / "train-00000.parquet"))
    source = open_source(str(folder), resolution=RES, cache_dir=str(tmp_path / "cache"))
    assert isinstance(source, HFDatasetSource)
    assert [r.caption for r in source] == ["caption 0", "caption 1"]


# ----------------------------------------------------------------------- webdataset


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_records_captions_and_bad_members(tmp_path: Path):
    shard = write_shard(
        tmp_path / "shard-000.tar",
        [
            ("s000", {"png": encode(rgb(40, 40)), "txt": b"from txt"}),
            ("dir/s001", {"jpg": encode(rgb(48, 40), "JPEG"), "json": json.dumps({"caption": "from json"}).encode()}),
            ("s002", {"jpg": b"corrupt jpeg", "txt": b"x"}),
            ("s003", {"json": b"{}"}),
            ("s004", {"png": encode(Image.new("L", (40, 40), 7)), "json": b"{not json"}),
            ("s005", {"webp": encode(rgb(40, 40, (9, 9, 9)), "WEBP"), "cond.png": encode(rgb(40, 40))}),
            ("s006", {"png": encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0))), "json": b'{"text": "clear"}'}),
        ],
    )
    source = WebDatasetSource(str(shard), RES, conditioning_extension="cond.png")
    records = list(source)
    for record in records:
        check_record(record)
    assert [(r.key, r.caption) for r in records] == [("s000", "from txt"), ("dir/s001", "from json"), ("s005", ""), ("s006", "clear")]
    assert records[2].conditioning is not None and records[0].attributes["shard"] == str(shard)
    assert source.stats.skipped == {"corrupt": 1, "no_image": 1, "corrupt_json": 1}
    assert source.stats.converted["rgba"] == 1 and records[3].image.getpixel((0, 0)) == (255, 255, 255)


def test_webdataset_brace_patterns_truncated_and_corrupt_shards(tmp_path: Path):
    for i in range(2):
        write_shard(tmp_path / f"shard-{i:03d}.tar", [(f"k{i}{j}", {"png": encode(rgb(40, 40)), "txt": b"c"}) for j in range(3)])
    full = (tmp_path / "shard-000.tar").read_bytes()
    # each sample is 4 blocks (header + data for png and txt): cut inside k02's png data,
    # and inside the header of k01's first member
    (tmp_path / "shard-002.tar").write_bytes(full[: 512 * 9 + 50])
    (tmp_path / "shard-004.tar").write_bytes(full[: 512 * 4 + 100])
    (tmp_path / "shard-003.tar").write_bytes(b"this is not a tar file at all" * 40)
    source = open_source(str(tmp_path / "shard-{000..004}.tar"), resolution=RES)
    assert isinstance(source, WebDatasetSource) and len(source.shards) == 5
    keys = [r.key for r in source]
    assert keys[:6] == ["k00", "k01", "k02", "k10", "k11", "k12"]
    # shard 2 keeps its complete samples; shard 4 ends in a cut header, so the sample
    # read last (k00) may be incomplete and is dropped
    assert keys[6:] == ["k00", "k01"]
    assert source.stats.errors == {"truncated_shard": 2, "corrupt_shard": 1}
    assert source.stats.skipped["truncated"] == 2
    glob_source = WebDatasetSource([str(tmp_path / "shard-00[01].tar")], RES)
    assert len(list(glob_source)) == 6
    with pytest.raises(FileNotFoundError, match=r"2 shard\(s\) not found: .*shard-008.tar.*shard-009.tar"):
        WebDatasetSource(str(tmp_path / "shard-{008..009}.tar"), RES)


def test_webdataset_all_bad_raises_empty(tmp_path: Path):
    shard = write_shard(tmp_path / "bad.tar", [("a", {"jpg": b"junk"}), ("b", {"txt": b"no image"})])
    with pytest.raises(EmptySourceError, match=r"corrupt=1, no_image=1"):
        list(WebDatasetSource(shard, RES))


def test_expand_braces():
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="goes down"):
        expand_braces("{3..1}")


# ------------------------------------------------------------------ synthetic + spec


def test_synthetic_source_records():
    source = open_source("synthetic:heldout:3", resolution=RES, seed=5)
    assert isinstance(source, SyntheticSource) and len(source) == 3
    records = list(source)
    for record in records:
        check_record(record)
        assert record.caption
        assert record.masks is not None and record.masks.dtype == bool and record.masks.shape[1:] == (RES, RES)
        assert record.attributes["split"] == "heldout"
    assert records[0].key == "synthetic-heldout-5-0000000"
    train = open_source("synthetic", resolution=RES, size=2)
    assert train.split == "train" and len(train) == 2
    assert np.asarray(list(train)[0].image).tobytes() != np.asarray(records[0].image).tobytes()


def test_open_source_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as info:
        open_source(str(tmp_path / "does" / "not" / "exist"))
    assert "synthetic:heldout" in str(info.value) and "save_to_disk" in str(info.value)
    with pytest.raises(ValueError, match="not an integer"):
        open_source("synthetic:train:many")
    with pytest.raises(ValueError, match="unknown synthetic split"):
        open_source("synthetic:valid")
    with pytest.raises(ValueError, match=r"accepted options: .*seed.*size"):
        open_source("synthetic", colour="red")
    with pytest.raises(ValueError, match="given twice"):
        open_source("synthetic:train:4", size=5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError):
        open_source(str(tmp_path / "empty"))


def test_open_source_image_folder_with_split_subfolders(tmp_path: Path):
    for split, n in (("train", 2), ("test", 1)):
        (tmp_path / split).mkdir()
        for i in range(n):
            rgb(40, 40).save(tmp_path / split / f"{i}.png")
    train = open_source(str(tmp_path), resolution=RES)
    assert isinstance(train, ImageFolderSource) and len(train) == 2
    assert len(open_source(str(tmp_path), resolution=RES, split="test")) == 1
    with pytest.raises(ValueError, match="split into folders"):
        open_source(str(tmp_path), resolution=RES, split="heldout")


def test_conditioning_follows_the_random_crop_and_half_size_maps_are_stretched(tmp_path: Path):
    arr = np.random.default_rng(3).integers(0, 255, (40, 120, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "img.png")
    Image.fromarray(arr).save(tmp_path / "same.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "img.png", "conditioning_file_name": "same.png"}) + "\n")
    crops = set()
    for seed in range(4):
        source = ImageFolderSource(tmp_path, RES, crop="random", seed=seed)
        (record,) = list(source)
        assert np.array_equal(np.asarray(record.conditioning), np.asarray(record.image))
        crops.add(np.asarray(record.image).tobytes())
    assert len(crops) > 1
    # a conditioning image at half the size covers the same scene: stretched, then cropped
    xx, yy = np.meshgrid(np.linspace(0, 255, 120), np.linspace(0, 255, 40))
    smooth = np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "img.png")
    Image.fromarray(smooth).resize((60, 20), Image.Resampling.BILINEAR).save(tmp_path / "same.png")
    (record,) = list(ImageFolderSource(tmp_path, RES))
    diff = np.abs(np.asarray(record.conditioning, np.float32) - np.asarray(record.image, np.float32))
    assert record.conditioning.size == (RES, RES) and diff.max() < 6  # a 10-pixel shift gives 11

def test_record_sequence_source_fits_depth_and_masks():
    from condistill.data import RecordSequenceSource

    depth = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (32, 1))  # 64 wide, 32 high
    masks = np.zeros((2, 32, 64), bool)
    masks[0, :, 32:] = True
    record = Record(image=Image.new("RGBA", (64, 32), (0, 0, 0, 0)), depth=depth, masks=masks, key="r")
    (fitted,) = list(RecordSequenceSource([record], resolution=16))
    check_record(fitted, 16)
    assert fitted.masks.shape == (2, 16, 16) and fitted.masks.dtype == bool
    assert fitted.masks[0, :, 8:].all() and not fitted.masks[0, :, :8].any() and not fitted.masks[1].any()
    assert 0.2 < fitted.depth[0, 0] < 0.3 and 0.7 < fitted.depth[0, -1] < 0.8  # center quarter..three quarters
    assert fitted.image.getpixel((0, 0)) == (255, 255, 255)
