"""Fingerprints of data sources: cheap descriptions that say in one line what changed."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from condistill.data.fingerprint import fingerprint_difference, source_fingerprint, unavailable
from condistill.files import sha256_file


def _images(folder: Path, names) -> None:
    folder.mkdir(exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 8), (7 * n % 256, 90, 40)).save(folder / f"{n:02d}.png")


def test_a_folder_of_16_images_grown_to_20_differs_and_an_unchanged_one_does_not(tmp_path):
    folder = tmp_path / "images"
    _images(folder, range(16))
    before = source_fingerprint(str(folder))
    assert before["kind"] == "files" and before["count"] == 16 and before["spec"] == str(folder)
    assert fingerprint_difference(json.loads(json.dumps(before)), source_fingerprint(str(folder))) is None
    _images(folder, range(16, 20))
    assert fingerprint_difference(before, source_fingerprint(str(folder))) == (
        f"{folder}: 4 files added (16.png, 17.png, 18.png, ...), 0 removed, 0 changed")
    assert "data options" in fingerprint_difference(before, source_fingerprint(str(folder), {"crop": "random"}))
    missing = source_fingerprint(str(tmp_path / "nowhere"))
    assert missing["kind"] == "missing" and unavailable(missing)


def test_a_big_folder_is_recorded_in_groups_of_names(tmp_path, monkeypatch):
    from condistill.data import fingerprint

    monkeypatch.setattr(fingerprint, "LISTED_FILES", 8)  # a big source: groups of names, not every name
    folder = tmp_path / "images"
    _images(folder, range(20))
    grouped = source_fingerprint(str(folder))
    assert "files" not in grouped and len(grouped["groups"]) <= fingerprint.GROUPS
    assert len(json.dumps(grouped)) < 30 * fingerprint.GROUPS  # small enough for a checkpoint, however big the source
    _images(folder, [20])
    assert fingerprint_difference(grouped, source_fingerprint(str(folder))).endswith(
        "20 files then, 21 now; 1 of 256 groups of names differ (names, sizes or modification times)")


def test_specs_caches_tar_shards_and_hub_datasets(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    spec = source_fingerprint("synthetic:train:8")
    assert spec == {"kind": "spec", "spec": "synthetic:train:8", "options": {}}
    assert fingerprint_difference(spec, source_fingerprint("synthetic:train:8")) is None
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_text(json.dumps({"format": "condistill-latent-cache", "complete": True, "shards": []}))
    own = source_fingerprint(str(cache))
    assert own["kind"] == "cache"
    # a rebuild of the same content differs only in its build time and its source's times: the same data
    (cache / "index.json").write_text(json.dumps({"format": "condistill-latent-cache", "complete": True, "shards": [],
                                                  "seconds": 9.5, "source": {"mtime": 1}}))
    assert fingerprint_difference(own, source_fingerprint(str(cache))) is None
    (cache / "index.json").write_text(json.dumps({"format": "condistill-latent-cache", "complete": True,
                                                  "shards": [{"file": "a", "sha256": "1"}]}))
    assert "rebuilt with other content" in fingerprint_difference(own, source_fingerprint(str(cache)))

    shards = str(tmp_path / "s-{0..2}.tar")
    for n in range(3):
        (tmp_path / f"s-{n}.tar").write_bytes(b"\0" * 1024)
    tars = source_fingerprint(shards)
    assert tars["count"] == 3
    (tmp_path / "s-2.tar").unlink()
    assert fingerprint_difference(tars, source_fingerprint(shards)).endswith("0 files added, 1 removed (s-2.tar), 0 changed")

    def hub(sha, files):
        return lambda self, repo, **kw: SimpleNamespace(sha=sha, siblings=[SimpleNamespace(rfilename=f, size=s)
                                                                           for f, s in files.items()])
    monkeypatch.setattr(HfApi, "dataset_info", hub("abc", {"data/train-0.parquet": 10}))
    then = source_fingerprint("someone/toy")
    monkeypatch.setattr(HfApi, "dataset_info", hub("def", {"data/train-0.parquet": 10, "data/train-1.parquet": 5}))
    assert fingerprint_difference(then, source_fingerprint("someone/toy")) == (
        "someone/toy: revision abc then, def now; 1 files added (data/train-1.parquet), 0 removed, 0 changed")

    def offline(self, *args, **kwargs):
        raise ConnectionError("offline")
    monkeypatch.setattr(HfApi, "dataset_info", offline)
    now = source_fingerprint("someone/toy")
    assert unavailable(now) == "the hub could not be asked (ConnectionError: offline)"
    assert fingerprint_difference(then, now) == "someone/toy could not be compared: the hub could not be asked (ConnectionError: offline)"
