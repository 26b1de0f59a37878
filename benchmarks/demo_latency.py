#!/usr/bin/env python
"""Latency of ``condistill demo``: the sampling part of one update, and a stroke to its image in a real browser.

1. **Sampling** (the primary figure): ``DemoModel.generate`` alone, the pipeline call a page update makes
   for one image (text embeddings kept while the prompt stays, as the page keeps them), at 1, 2 and 4
   steps, ``--updates`` calls each after ``--warmup`` untimed ones.
2. **Browser**: the page served on a loopback port and driven by headless Chromium (Selenium, the system's
   chromium and chromium-driver) on the same machine. For each step count, ``--updates`` strokes are drawn
   one after another, each once the previous one's image is shown; a stroke's latency is from the pen
   lifting (``pointerup`` in the page) to its image decoded in the page.
3. **Continuous drawing** (``--draw-seconds``, 0 skips it): strokes drawn back to back without waiting
   for images, at one step; reports how many times the canvas sent its strokes, how many updates the
   page sampled (latest change wins: the rest were dropped, not queued), and how long after the last
   stroke the page showed its image (no backlog: about one or two sampling times).

Torch's thread count is fixed (``--threads``) and the browser runs on the same CPU, so its own work
(drawing, decoding the PNGs) is part of the browser figures. The student is any run of the condition
(``--student``); without one, an edge ControlNet on the embedded teacher is trained for
``--train-steps`` steps first: a call costs the same whatever the weights, and a few dozen steps
make each stroke's image differ from the last, which the browser figures need.

    python benchmarks/demo_latency.py --threads 1 --updates 50 --out docs/benchmarks/demo_latency_cpu.json
    python benchmarks/demo_latency.py --threads 1 --decoder embedded:tiny-decoder --out latency-tiny-decoder.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "demo"))


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"median_ms": round(statistics.median(ms), 1), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
            "n": len(ms)}


def student(args) -> str:
    if args.student:
        return args.student
    from condistill.config import DistillConfig
    from condistill.training.loop import distill

    out = Path(tempfile.mkdtemp(prefix="demo-latency-")) / "edge"
    distill(DistillConfig(condition="edge", adapter="controlnet", base="embedded:tiny-teacher",
                          data="synthetic:train:64", output_dir=str(out), max_steps=args.train_steps, batch_size=8,
                          checkpoint_every=0, validate_every=0, log_every=10, seed=0))
    return str(out)


def sampling(run: str, args, decoder=None) -> dict:
    from condistill.demo.models import DemoModel
    from condistill.world.scenes import generate_scene

    model = DemoModel(run, decoder=decoder)
    control = model.condition.control_image(generate_scene(0, "heldout", resolution=model.resolution).image)
    out = {}
    for steps in (1, 2, 4):
        for _ in range(args.warmup):
            model.generate(control, "a red cube", steps=steps)
        out[str(steps)] = summary([model.generate(control, "a red cube", steps=steps, seed=k).seconds
                                   for k in range(args.updates)])
    return out


def _stroke_points(k: int):
    x, y = -150 + (k * 37) % 300, -150 + (k * 53) % 300
    return [(x, y), (x + 40, y + 10), (x + 70, y + 40)]


def browser_latency(run: str, args) -> dict:
    from browser import browser, free_port, open_page, stroke, wait_for

    from condistill.demo import launch

    demo, url = launch([run], port=free_port(), block=False, decoder=args.decoder)
    page = demo.condistill_page
    calls = []  # (start, end) of each sampled update, ms since the epoch
    original = page.column

    def stamped(i, *a):
        start = time.time() * 1000
        result = original(i, *a)
        calls.append((start, time.time() * 1000))
        return result

    page.column = stamped
    driver = browser()
    out = {}
    try:
        open_page(driver, url)
        origin = driver.execute_script("return performance.timeOrigin")
        k = 0
        for steps in (1, 2, 4):
            driver.find_element("xpath", f"//label[.//span[text()='{steps}']]").click()
            time.sleep(1.0)
            latencies, before, after = [], [], []
            for i in range(args.updates + 2):  # the first two warm up
                times = driver.execute_script("return window.condistillTimes")
                shown_before = len(times["shown"].get("condistill-output-0", []))
                stroke(driver, _stroke_points(k))
                k += 1
                release = driver.execute_script("return window.condistillTimes.release.slice(-1)[0]")
                shown = wait_for(lambda: (s := driver.execute_script(
                    "return window.condistillTimes.shown['condistill-output-0'] || []")) and len(s) > shown_before
                    and s[-1][0] > release and s, 30, "the stroke's image")
                time.sleep(0.3)  # the pen rests: any later image of the same stroke lands before the next
                final = driver.execute_script("return window.condistillTimes.shown['condistill-output-0']")
                if i >= 2:
                    latencies.append((final[-1][0] - release) / 1000)
                    last = [c for c in calls if c[0] >= origin + release]
                    if last:  # the page's own share: the pen lifting to the last call, its end to the image shown
                        before.append((last[-1][0] - origin - release) / 1000)
                        after.append((origin + final[-1][0] - last[-1][1]) / 1000)
            out[str(steps)] = {**summary(latencies), "release_to_last_call_start": summary(before) if before else None,
                               "last_call_end_to_shown": summary(after) if after else None}
        page.column = original
        if args.draw_seconds:
            out["continuous"] = continuous(driver, demo, args)
    finally:
        driver.quit()
        demo.close()
    return out


def continuous(driver, demo, args) -> dict:
    """Strokes back to back for ``--draw-seconds`` at one step; what the page sampled and how late it ended."""
    from browser import stroke, wait_for

    driver.find_element("xpath", "//label[.//span[text()='1']]").click()
    time.sleep(1.0)
    page = demo.condistill_page
    calls = []
    original = page.column

    def counted(i, *a):
        calls.append(time.time())
        return original(i, *a)

    page.column = counted
    sends_before = driver.execute_script("return window.condistillTimes.release.length")
    end = time.monotonic() + args.draw_seconds
    strokes = 0
    while time.monotonic() < end:
        stroke(driver, _stroke_points(1000 + strokes))
        strokes += 1
    release = driver.execute_script("return window.condistillTimes.release.slice(-1)[0]")
    shown = wait_for(lambda: (s := driver.execute_script("return window.condistillTimes.shown['condistill-output-0']"))
                     and s[-1][0] > release and s, 60, "the last stroke's image")
    time.sleep(1.0)
    shown = driver.execute_script("return window.condistillTimes.shown['condistill-output-0']")
    page.column = original
    return {"seconds": args.draw_seconds, "strokes": strokes,
            "releases": driver.execute_script("return window.condistillTimes.release.length") - sends_before,
            "updates_sampled": len(calls), "after_last_stroke_ms": round(shown[-1][0] - release, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", help="run folder of the student [an edge ControlNet trained here]")
    p.add_argument("--train-steps", type=int, default=40, help="steps of the student trained here [40]")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads [2]")
    p.add_argument("--updates", type=int, default=50, help="timed updates per step count [50]")
    p.add_argument("--warmup", type=int, default=5, help="untimed sampling calls first [5]")
    p.add_argument("--draw-seconds", type=float, default=60, help="continuous drawing, seconds (0: skip) [60]")
    p.add_argument("--no-browser", action="store_true", help="only the sampling figures")
    p.add_argument("--decoder", help="a fast decoder (e.g. embedded:tiny-decoder): sampling is also timed with it, "
                   "and the browser figures use it [the full VAE]")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    run = student(args)
    report = {"threads": args.threads, "student": args.student or f"edge ControlNet, embedded teacher, "
              f"{args.train_steps} steps", "sampling": sampling(run, args)}
    if args.decoder:
        report["sampling_" + args.decoder] = sampling(run, args, decoder=args.decoder)
    if not args.no_browser:
        report["browser"] = browser_latency(run, args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
