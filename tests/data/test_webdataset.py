"""Webdataset tar shards: members, captions, brace patterns, truncated and corrupt shards."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from source_helpers import RES, check_record, encode, rgb  # noqa: E402

from condistill.data import EmptySourceError, WebDatasetSource, expand_braces, open_source  # noqa: E402


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
