"""Write the repository's ``data/`` folder: small example sources in every training-data format condistill reads.

    python tools/make_example_data.py [--out data]

Every image is a scene of the embedded world (``condistill.world.scenes``, 64 px, the embedded teacher's
resolution), so the examples train and evaluate with the default base and nothing downloaded:

* ``images/``: an image folder with caption sidecars (``NAME.png`` + ``NAME.txt``), 8 training scenes;
* ``paired/``: a ``datasets`` ``save_to_disk`` folder in the layout of diffusers' ControlNet training sets
  (``image``, ``conditioning_image``, ``text``): 8 training scenes with their Canny edge maps as the control image;
* ``paired-folder/``: the same pairs as an image folder with caption sidecars (``images/``) and a parallel folder
  of control images named like them (``control/``);
* ``shards/train-000000.tar``: one webdataset shard (``KEY.png`` + ``KEY.txt``, and the control image as
  ``KEY.conditioning.png``), 8 training scenes;
* ``validation/``: 4 held-out scenes with captions, for ``condistill eval --data``.

The output is the same on every run (fixed scene indices and encoder settings).
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VALIDATION = range(8), range(4)


def _scenes(split: str, indices):
    from condistill.world.scenes import generate_scene

    return [generate_scene(i, split) for i in indices]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _folder(out: Path, records, prefix: str) -> None:
    out.mkdir(parents=True)
    for i, record in enumerate(records):
        (out / f"{prefix}-{i:03d}.png").write_bytes(_png(record.image))
        (out / f"{prefix}-{i:03d}.txt").write_text(record.caption + "\n")


def _control(record):
    """The example control image of a scene: its Canny edge map, white on black."""
    from PIL import Image as PILImage

    from condistill.conditions.edge import canny_edges

    return PILImage.fromarray(((canny_edges(record.image) > 0) * 255).astype("uint8")).convert("RGB")


def _shard(out: Path, records) -> None:
    out.parent.mkdir(parents=True)
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, record in enumerate(records):
            members = ((".png", _png(record.image)), (".txt", (record.caption + "\n").encode()),
                       (".conditioning.png", _png(_control(record))))
            for suffix, data in members:
                info = tarfile.TarInfo(f"scene-{i:03d}{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def _paired(out: Path, records) -> None:
    from datasets import Dataset, Features, Image, Value

    rows = {"image": [], "conditioning_image": [], "text": []}
    for record in records:
        rows["image"].append(record.image)
        rows["conditioning_image"].append(_control(record))
        rows["text"].append(record.caption)
    features = Features({"image": Image(), "conditioning_image": Image(), "text": Value("string")})
    Dataset.from_dict(rows, features=features).save_to_disk(str(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data", help="the folder to (re)write [%(default)s]")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    out = args.out
    for name in ("images", "paired", "paired-folder", "shards", "validation"):
        shutil.rmtree(out / name, ignore_errors=True)
    train = _scenes("train", TRAIN)
    _folder(out / "images", train, "scene")
    _paired(out / "paired", train)
    _folder(out / "paired-folder" / "images", train, "scene")
    (out / "paired-folder" / "control").mkdir()
    for i, record in enumerate(train):
        (out / "paired-folder" / "control" / f"scene-{i:03d}.png").write_bytes(_png(_control(record)))
    _shard(out / "shards" / "train-000000.tar", train)
    _folder(out / "validation", _scenes("heldout", VALIDATION), "heldout")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
