"""Optional metrics that need third-party pretrained weights: LPIPS, FID on Inception features, CLIPScore.

They are computed only when both the package and its weights are already on the machine;
nothing here ever downloads anything. The rule, per metric:

* ``lpips`` (LPIPS v0.1, AlexNet trunk; sr and inpaint rows, each image paired with its
  ground truth, mean over pairs, images mapped from [0, 1] to [-1, 1]): the ``lpips`` PyPI
  package imports, its bundled linear-layer weights ``lpips/weights/v0.1/alex.pth`` exist, and
  torchvision's AlexNet weights ``alexnet-owt-7be5be79.pth`` are in the torch hub cache,
  ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``, by default
  ``~/.cache/torch/hub/checkpoints``). Images smaller than :data:`LPIPS_MIN_SIZE` pixels are
  bilinearly up-sampled to it first (AlexNet's pooling needs at least 31 pixels).
* ``fid_inception`` (every row: Frechet distance between the 2048-d pool features of the FID
  Inception network on the generated and on the real held-out images): the ``pytorch_fid``
  PyPI package imports and ``pt_inception-2015-12-05-6726825d.pth`` is in that same
  checkpoints folder. torchmetrics / torch-fidelity are deliberately not consulted, so one
  rule decides. Like every FID, the value is biased upwards for small sets and is only
  comparable between rows scored on the same number of images.
* ``clip_score`` (only when prompts are given: ``100 * max(cos, 0)`` of CLIP's image and text
  embeddings, Hessel et al. 2021, mean over images): ``transformers`` loads a CLIP model
  (``openai/clip-vit-base-patch32``, or ``$CONDISTILL_CLIP_MODEL``) from a local folder or the
  local Hugging Face cache with ``local_files_only=True``; implemented in
  :mod:`condistill.evaluation.clip_score` and registered here.

:func:`lpips_status` / :func:`fid_status` / :func:`clip_status` say whether a metric is available and, if not,
exactly what is missing and how to provide it. Networks are built only after that check,
inside :func:`no_downloads`, which makes any attempted download raise instead.

Tests (or users with their own networks) can replace a backend with :func:`set_backend`
(:mod:`condistill.evaluation.backends`, which this module and :mod:`~condistill.evaluation.clip_score` share).
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from condistill.evaluation import backends
from condistill.evaluation import clip_score as _clip
from condistill.evaluation.backends import METRICS, check_images, no_downloads, set_backend
from condistill.evaluation.clip_score import CLIP_MODEL, CLIP_MODEL_ENV, clip_score, clip_status, load_clip

LPIPS_WEIGHTS = "alexnet-owt-7be5be79.pth"
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS
LPIPS_CONDITIONS = ("sr", "inpaint")
LPIPS_MIN_SIZE = 64
def checkpoints_dir() -> Path:
    """The torch hub checkpoints folder where the weights files must be."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def shown_path(path: Path) -> str:
    """``path`` as a message shows it: under the home folder as ``~/...``, so a report written on
    one machine (results.json is committed and shared) names the place on any machine."""
    try:
        return "~/" + Path(path).relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


def lpips_status() -> tuple[bool, str]:
    """``(available, reason)`` for LPIPS; ``reason`` names what is missing and how to provide it."""
    if "lpips" in backends.BACKENDS:
        return True, "LPIPS: injected backend"
    weights = checkpoints_dir() / LPIPS_WEIGHTS
    missing = []
    module = backends.try_import("lpips")
    if module is None:
        missing.append("Python package 'lpips' is not installed (pip install lpips)")
    else:
        linear = Path(module.__file__).parent / "weights" / "v0.1" / "alex.pth"
        if not linear.is_file():
            missing.append("the lpips package's linear-layer weights (weights/v0.1/alex.pth inside it) are missing "
                           "(pip install --force-reinstall lpips)")
    if not weights.is_file():
        missing.append(f"weights file {shown_path(weights)} not found (place torchvision's AlexNet ImageNet weights "
                       f"{LPIPS_WEIGHTS} there, or run once with internet: python -c \"import torchvision; "
                       "torchvision.models.alexnet(weights='IMAGENET1K_V1')\")")
    if missing:
        return False, "LPIPS skipped: " + "; ".join(missing) + "; provide them to enable it"
    return True, f"LPIPS v0.1 (AlexNet) with {shown_path(weights)}"


def fid_status() -> tuple[bool, str]:
    """``(available, reason)`` for FID on Inception features (pytorch_fid rule, see the module doc)."""
    if "fid_inception" in backends.BACKENDS:
        return True, "FID (Inception): injected backend"
    weights = checkpoints_dir() / FID_WEIGHTS
    missing = []
    if backends.try_import("pytorch_fid") is None:
        missing.append("Python package 'pytorch_fid' is not installed (pip install pytorch-fid)")
    if not weights.is_file():
        missing.append(f"weights file {shown_path(weights)} not found (download {FID_WEIGHTS_URL} and place it there)")
    if missing:
        return False, "FID (Inception) skipped: " + "; ".join(missing) + "; provide them to enable it"
    return True, f"FID on pytorch_fid's Inception pool features with {shown_path(weights)}"


STATUS = {"lpips": lpips_status, "fid_inception": fid_status,
          "clip_score": lambda: _clip.clip_status()}


def _override_or_require(metric: str, device) -> Callable | None:
    """The backend set by :func:`set_backend` for ``metric``, else ``None`` once the metric's
    package and weights are known to be present (raises ``RuntimeError`` with the reason if not)."""
    if metric in backends.BACKENDS:
        return backends.BACKENDS[metric](device)
    ok, reason = STATUS[metric]()
    if not ok:
        raise RuntimeError(reason)
    return None


def load_lpips(device: str | torch.device = "cpu") -> Callable:
    """``fn(a, b) -> [B]``: LPIPS distances of image batches in [-1, 1]; raises if unavailable."""
    override = _override_or_require("lpips", device)
    if override is not None:
        return override
    import lpips

    kwargs = {"pretrained": True, "net": "alex", "version": "0.1"}
    if "verbose" in inspect.signature(lpips.LPIPS.__init__).parameters:
        kwargs["verbose"] = False
    with no_downloads():
        net = lpips.LPIPS(**kwargs).eval().to(device)

    @torch.no_grad()
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return net(a, b).flatten()

    return distance


def load_inception(device: str | torch.device = "cpu") -> Callable:
    """``fn(x) -> [B, 2048]``: FID Inception pool features of images in [0, 1]; raises if unavailable."""
    override = _override_or_require("fid_inception", device)
    if override is not None:
        return override
    from pytorch_fid.inception import InceptionV3

    with no_downloads():
        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        return net(x)[0].flatten(1)

    return features


LOADERS = {"lpips": load_lpips, "fid_inception": load_inception,
           "clip_score": lambda device="cpu": _clip.load_clip(device)}


@torch.no_grad()
def lpips_distance(images: torch.Tensor, reference: torch.Tensor, net: Callable | None = None, *,
                   device: str | torch.device = "cpu", batch_size: int = 32) -> float:
    """Mean LPIPS over the pairs ``(images[i], reference[i])``, both ``[N, 3, H, W]`` in [0, 1]."""
    a, b = check_images(images, "images"), check_images(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"images and reference must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if net is None:
        net = load_lpips(device)
    total = 0.0
    for i in range(0, a.shape[0], batch_size):
        x, y = (t[i:i + batch_size].to(device=device, dtype=torch.float32) * 2 - 1 for t in (a, b))
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            scale = LPIPS_MIN_SIZE / min(x.shape[-2:])
            size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
            x, y = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (x, y))
        total += float(torch.as_tensor(net(x, y)).double().flatten().sum())
    return total / a.shape[0]


@torch.no_grad()
def inception_features(images: torch.Tensor, net: Callable | None = None, *, device: str | torch.device = "cpu",
                       batch_size: int = 32) -> torch.Tensor:
    """FID Inception features ``[N, D]`` (float64, CPU) of ``images [N, 3, H, W]`` in [0, 1]."""
    x = check_images(images, "images")
    if net is None:
        net = load_inception(device)
    return torch.cat([torch.as_tensor(net(x[i:i + batch_size].to(device=device, dtype=torch.float32)))
                      .flatten(1).double().cpu() for i in range(0, x.shape[0], batch_size)])


def fid_inception(images: torch.Tensor, reference: torch.Tensor, net: Callable | None = None, *,
                  device: str | torch.device = "cpu", batch_size: int = 32) -> float:
    """FID between generated ``images`` and real ``reference`` images (both ``[N, 3, H, W]`` in [0, 1])."""
    from condistill.evaluation.metrics import frechet_distance

    if net is None:
        net = load_inception(device)
    return frechet_distance(inception_features(images, net, device=device, batch_size=batch_size),
                            inception_features(reference, net, device=device, batch_size=batch_size))


def compute_optional(images: torch.Tensor, reference: torch.Tensor, kind: str, *,
                     device: str | torch.device = "cpu") -> float | None:
    """``kind`` (one of :data:`METRICS`) of ``images`` against ``reference`` (for ``"clip_score"``:
    the list of prompts, one per image), or ``None`` when that metric is unavailable (see
    :func:`lpips_status` / :func:`fid_status` / :func:`clip_status`)."""
    if kind not in METRICS:
        raise ValueError(f"unknown optional metric {kind!r}; choose one of {METRICS}")
    if not STATUS[kind]()[0]:
        return None
    fn = {"lpips": lpips_distance, "fid_inception": fid_inception, "clip_score": _clip.clip_score}[kind]
    return fn(images, reference, device=device)


class OptionalMetrics:
    """The optional metrics of one evaluation: checks availability once, logs each skip once,
    loads each network once and caches the real images' Inception features.

    ``skipped`` maps each wanted but unavailable metric to its reason (also when loading an
    apparently available network fails). ``clip_score`` is wanted (and its availability checked)
    only from the first :meth:`score` call given ``prompts``. ``log`` receives each skip message; by default it is
    issued with :func:`warnings.warn`.
    """

    def __init__(self, condition_name: str, *, device: str | torch.device = "cpu",
                 log: Callable[[str], None] | None = None, batch_size: int = 32):
        self.device, self.batch_size, self.log = device, batch_size, log
        self.wanted = (["lpips"] if condition_name in LPIPS_CONDITIONS else []) + ["fid_inception"]
        self.skipped: dict[str, str] = {}
        self._nets: dict[str, Callable] = {}
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None
        for metric in self.wanted:
            ok, reason = STATUS[metric]()
            if not ok:
                self._skip(metric, reason)

    def _skip(self, metric: str, reason: str) -> None:
        self.skipped[metric] = reason
        if self.log is not None:
            self.log(reason)
        else:
            warnings.warn(reason, stacklevel=3)

    def _net(self, metric: str) -> Callable | None:
        if metric in self.skipped:
            return None
        if metric not in self._nets:
            try:
                self._nets[metric] = LOADERS[metric](self.device)
            except Exception as error:  # noqa: BLE001 - a corrupt file or a refused download: skip, say why
                self._skip(metric, f"{metric} skipped: loading its network failed ({type(error).__name__}: {error})")
                return None
        return self._nets[metric]

    def score(self, images: torch.Tensor, real: torch.Tensor, prompts: Sequence[str] | None = None) -> dict:
        """The available optional metrics of ``images`` against the ground truth ``real`` (both in [0, 1]),
        plus ``clip_score`` of ``images`` with ``prompts`` (one per image) when they are given."""
        out = {}
        if "lpips" in self.wanted and (net := self._net("lpips")) is not None:
            out["lpips"] = lpips_distance(images, real, net, device=self.device, batch_size=self.batch_size)
        if (net := self._net("fid_inception")) is not None:
            from condistill.evaluation.metrics import frechet_distance

            if self._real is None or not (self._real[0] is real or (self._real[0].shape == real.shape
                                                                   and torch.equal(self._real[0], real))):
                self._real = (real, inception_features(real, net, device=self.device, batch_size=self.batch_size))
            feats = inception_features(images, net, device=self.device, batch_size=self.batch_size)
            out["fid_inception"] = frechet_distance(feats, self._real[1])
        if prompts is not None:
            if "clip_score" not in self.wanted:
                self.wanted.append("clip_score")
                ok, reason = STATUS["clip_score"]()
                if not ok:
                    self._skip("clip_score", reason)
            if (net := self._net("clip_score")) is not None:
                out["clip_score"] = _clip.clip_score(images, prompts, net, device=self.device,
                                                     batch_size=self.batch_size)
        return out


__all__ = [
    "CLIP_MODEL",
    "CLIP_MODEL_ENV",
    "LPIPS_WEIGHTS",
    "FID_WEIGHTS",
    "OptionalMetrics",
    "checkpoints_dir",
    "clip_score",
    "clip_status",
    "compute_optional",
    "fid_inception",
    "fid_status",
    "inception_features",
    "load_clip",
    "load_inception",
    "load_lpips",
    "lpips_distance",
    "lpips_status",
    "no_downloads",
    "set_backend",
]
