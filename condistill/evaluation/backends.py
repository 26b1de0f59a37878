"""What the optional metrics share: the networks set in place of the real ones, and the no-download rule.

:mod:`condistill.evaluation.third_party` (LPIPS, FID on Inception features) and
:mod:`condistill.evaluation.clip_score` (CLIPScore) both import this module and neither imports
the other's internals: third_party registers CLIPScore beside its own metrics.

- :data:`BACKENDS` / :func:`set_backend`: a stand-in network per metric (tests, or users with
  their own networks); an injected backend counts as available.
- :func:`try_import`: a package, or ``None`` when it is missing or broken.
- :func:`no_downloads`: torch hub downloads raise while it is active.
- :func:`check_images`: the ``[N, 3, H, W]`` image batches every metric takes.
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Callable

import torch

__all__ = ["METRICS", "BACKENDS", "set_backend", "try_import", "no_downloads", "check_images"]

METRICS = ("lpips", "fid_inception", "clip_score")

#: metric -> factory(device) returning the network as a callable (see :func:`set_backend`)
BACKENDS: dict[str, Callable] = {}


def set_backend(metric: str, factory: Callable | None) -> None:
    """Replace the network behind ``metric`` (one of :data:`METRICS`); ``None`` restores it.

    ``factory(device)`` returns, for ``"lpips"``, ``fn(a, b) -> [B]`` distances between image
    batches in [-1, 1]; for ``"fid_inception"``, ``fn(x) -> [B, D]`` features of images in
    [0, 1]; for ``"clip_score"``, ``fn(images, prompts) -> [B]`` scores of images in [0, 1] with
    their prompts. An injected backend counts as available.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown optional metric {metric!r}; choose one of {METRICS}")
    if factory is None:
        BACKENDS.pop(metric, None)
    else:
        BACKENDS[metric] = factory


def try_import(name: str):
    """The module ``name``, or ``None`` when it is not installed or fails to import."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return None


@contextlib.contextmanager
def no_downloads():
    """Make torch hub downloads (used by torchvision, lpips and pytorch_fid) raise while active."""
    import torch.hub as hub

    original = hub.download_url_to_file

    def refuse(url, dst, *args, **kwargs):
        raise RuntimeError(f"condistill's optional metrics never download: refused {url}; place the file at "
                           f"{Path(dst).parent} yourself")

    hub.download_url_to_file = refuse
    try:
        yield
    finally:
        hub.download_url_to_file = original


def check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """``images`` when it is a ``[N, 3, H, W]`` tensor, else a ``ValueError`` naming ``name``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be a tensor [N, 3, H, W] in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    return images
