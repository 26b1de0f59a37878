"""``condistill demo``: see a distilled student live, in the browser, while you draw or edit its condition.

::

    pip install "condistill[demo]"
    condistill demo runs/edge                     # one student
    condistill demo runs/edge runs/edge-baseline  # beside a second student or a conventional adapter

Python: ``condistill.demo.launch(["runs/edge"])``. The page (:mod:`condistill.demo.app`) binds to
127.0.0.1 unless ``--host`` says otherwise, and makes a public share link only with ``--share``.
"""
from __future__ import annotations

import argparse
import importlib.util
import ipaddress

from condistill.demo.inputs import MAX_UPLOAD_BYTES

__all__ = ["launch", "load_models", "main"]

PROG = "condistill demo"
# the images are small (the training resolution): shown large, pixels kept sharp
CSS = ("[id^=condistill-output-] img, #condistill-control img {image-rendering: pixelated; width: 100%; "
       "height: 100%; object-fit: contain}")


class MissingExtra(ImportError, ValueError):
    """The demo's optional dependencies are not installed (a ``ValueError`` too, so the command says it in one line)."""


def require_gradio() -> None:
    """Refuse in one line when the demo's extra is not installed."""
    if importlib.util.find_spec("gradio") is None:
        raise MissingExtra("condistill demo needs Gradio, which is not installed: pip install 'condistill[demo]'")


def load_models(refs, *, device: str = "cpu", decoder=None) -> list:
    """The :class:`~condistill.demo.models.DemoModel` of each run, adapter folder or hub id, checked to share one
    condition (a page has one input). Every folder is found before any model loads."""
    from condistill.demo.models import DemoModel
    from condistill.pipeline import resolve_adapter_dir

    refs = list(refs)
    if not refs:
        raise ValueError("give at least one run, adapter folder or hub id")
    from condistill.adapters.save_load import read_adapter_config

    trained = []
    for ref in refs:  # every folder found and its config read before anything loads
        config = read_adapter_config(resolve_adapter_dir(ref))
        trained.append((config["condition_name"], int(config["resolution"])))
    for ref, (name, resolution) in zip(refs[1:], trained[1:]):
        if (name, resolution) != trained[0]:
            raise ValueError(
                f"{ref} was trained for {name} at {resolution} px but {refs[0]} for {trained[0][0]} at "
                f"{trained[0][1]} px; a page shows students of one condition and resolution: run one demo for each")
    models = [DemoModel(ref, device=device, decoder=decoder) for ref in refs]
    return models


def launch(refs, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, device: str = "cpu",
           decoder=None, max_upload_bytes: int = MAX_UPLOAD_BYTES, block: bool = True, threads: int | None = None):
    """Load the students and serve their page; returns ``(demo, url)`` (with ``block=False`` at once)."""
    require_gradio()
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from condistill.demo.app import build

    models = load_models(refs, device=device, decoder=decoder)
    demo = build(models)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_upload_bytes,
                            prevent_thread_lock=True, quiet=True, show_error=False, footer_links=[], css=CSS)
    if block:
        print(f"{PROG}: serving {', '.join(str(r) for r in refs)} at {url} (Ctrl-C stops it)", flush=True)
        demo.block_thread()
    return demo, url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parser() -> argparse.ArgumentParser:
    from condistill.cli_parsing import DEBUG_FLAG, DEBUG_HELP, CommandParser

    p = CommandParser(prog=PROG, description="Serve a page that shows one or more students live: draw or upload "
                      "their condition and the images follow (needs pip install 'condistill[demo]').",
                      epilog="Defaults are shown in brackets.")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_REPO",
                   help="run folders, adapter folders or hub ids, of one condition; the first is the student, the "
                   "others are shown beside it (a conventional adapter samples 50 DDIM steps + CFG)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1: this machine only]")
    p.add_argument("--port", type=int, default=7860, help="port [7860]")
    p.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda [cpu]")
    p.add_argument("--decoder", help="a fast decoder for the pipelines, e.g. embedded:tiny-decoder [the full VAE]")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default) [0]")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                   help=f"largest upload accepted, in MB [{MAX_UPLOAD_BYTES / 2**20:.0f}]")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


def main(argv) -> int:
    import sys

    args = parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a port is between 0 and 65535")
    if args.max_upload_mb <= 0 or args.threads < 0:
        raise ValueError("--max-upload-mb must be positive and --threads at least 0")
    require_gradio()
    if not _is_loopback(args.host):
        print(f"{PROG}: note: --host {args.host} serves the page to other machines too", file=sys.stderr)
    launch(args.runs, host=args.host, port=args.port, share=args.share, device=args.device, decoder=args.decoder,
           max_upload_bytes=int(args.max_upload_mb * 2**20), threads=args.threads or None)
    return 0
