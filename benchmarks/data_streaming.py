#!/usr/bin/env python
"""Peak memory and images/s of reading the same images as 1 tar shard, as 40 shards, and the other ways.

Writes ``--images`` generated JPEG images (``--size`` pixels, smooth colour fields plus noise,
deterministic) once as one tar shard, as 40 tar shards and as a ``datasets`` ``save_to_disk``
folder, then reads ``--reads`` training items (image + ``--condition`` tensor, at
``--resolution``) in a fresh Python process per configuration:

* ``stream-1``, ``stream-40``: ``StreamingConditionDataset`` (shuffle buffer ``--shuffle-buffer``);
* ``materialise-40``: ``ConditionDataset`` over the 40 shards (reads them whole into memory);
* ``save_to_disk``: ``ConditionDataset`` over the ``datasets`` folder (memory-mapped Arrow).

Each process reports ``ru_maxrss`` (peak resident memory, which counts touched pages of mapped
files too), the resident memory after imports and opening (``rss_start``), and at the end the
anonymous (``rss_anon``: heap) and file-backed (``rss_file``: mapped files, reclaimable) parts
from ``/proc/self/status``. Prints a markdown table; ``--out`` also writes the JSON.

    python benchmarks/data_streaming.py --images 1000 --size 256 --resolution 256 --reads 2000 --out streaming.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CONFIGS = ("stream-1", "stream-40", "materialise-40", "save_to_disk")


def _image(n: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(n)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(5 * y * rng.uniform(0.5, 2))
                     for _ in range(3)], -1)
    pixels = np.clip((base * 0.5 + 0.5) * 230 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_data(folder: Path, images: int, size: int) -> dict[str, str]:
    """The same images as one shard, 40 shards and a save_to_disk folder; returns the specs."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    specs = {"1": str(folder / "one" / "all.tar"), "40": str(folder / "forty" / "s-{00..39}.tar"),
             "saved": str(folder / "saved")}
    if (folder / "done").exists():
        return specs
    (folder / "one").mkdir(exist_ok=True)
    (folder / "forty").mkdir(exist_ok=True)
    one = tarfile.open(specs["1"], "w")
    forty = [tarfile.open(folder / "forty" / f"s-{s:02d}.tar", "w") for s in range(40)]
    rows = {"image": [], "text": []}
    for n in range(images):
        data, caption = _image(n, size), f"image {n}".encode()
        for tar in (one, forty[n * 40 // images]):
            for ext, payload in (("jpg", data), ("txt", caption)):
                info = tarfile.TarInfo(f"{n:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        rows["image"].append({"bytes": data, "path": None})
        rows["text"].append(caption.decode())
    for tar in [one, *forty]:
        tar.close()
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(specs["saved"])
    (folder / "done").write_text("")
    return specs


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def run_one(config: str, specs: dict[str, str], args) -> dict:
    """Read ``args.reads`` items in this process; the measurements of ``config``."""
    import torch

    from condistill.conditions import get_condition
    from condistill.data import ConditionDataset, open_source
    from condistill.data.streaming import StreamingConditionDataset

    torch.set_num_threads(1)
    condition = get_condition(args.condition)
    spec = {"stream-1": specs["1"], "stream-40": specs["40"], "materialise-40": specs["40"],
            "save_to_disk": specs["saved"]}[config]
    source = open_source(spec, resolution=args.resolution)
    if config.startswith("stream"):
        dataset = StreamingConditionDataset(source, condition, None, 0, batch_size=1,
                                            shuffle_buffer=args.shuffle_buffer)
        items = iter(dataset)
        read = lambda i: next(items)  # noqa: E731
    else:
        dataset = ConditionDataset(source, condition, seed=0)
        read = lambda i: dataset[i % len(dataset)]  # noqa: E731  (the first access reads a tar source whole)
    rss_start = _status_kib("VmRSS")
    started = time.perf_counter()
    checksum = 0.0
    for i in range(args.reads):
        checksum += float(read(i)["pixel_values"][0, 0, 0])
    seconds = time.perf_counter() - started
    return {"config": config, "reads": args.reads, "images_per_s": args.reads / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_start_mib": rss_start / 1024, "rss_anon_mib": _status_kib("RssAnon") / 1024,
            "rss_file_mib": _status_kib("RssFile") / 1024, "checksum": checksum}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images written [1000]")
    parser.add_argument("--size", type=int, default=256, help="side of the written JPEGs [256]")
    parser.add_argument("--resolution", type=int, default=256, help="training resolution [256]")
    parser.add_argument("--reads", type=int, default=2000, help="items read per configuration [2000]")
    parser.add_argument("--condition", default="sr", help="condition computed per item [sr]")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="streaming shuffle buffer [1000]")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--work", help="folder for the written data (kept; reused when complete) [a temporary one]")
    parser.add_argument("--out", help="also write the JSON report here")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--specs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, json.loads(args.specs), args)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        specs = write_data(Path(args.work or tmp), args.images, args.size)
        rows = []
        for config in args.configs:  # a fresh process each: ru_maxrss is per process
            command = [sys.executable, os.path.abspath(__file__), "--child", config, "--specs", json.dumps(specs),
                       "--reads", str(args.reads), "--resolution", str(args.resolution), "--condition",
                       args.condition, "--shuffle-buffer", str(args.shuffle_buffer)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {"images": args.images, "size": args.size, "resolution": args.resolution, "reads": args.reads,
              "condition": args.condition, "shuffle_buffer": args.shuffle_buffer, "rows": rows}
    print("| configuration | images/s | peak RSS MiB | RSS after opening MiB | heap (RssAnon) MiB at end | mapped files (RssFile) MiB at end |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['images_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['rss_start_mib']:.0f} | "
              f"{r['rss_anon_mib']:.0f} | {r['rss_file_mib']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
